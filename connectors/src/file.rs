//! The `file` connector: each batch becomes one file in a folder.
//!
//! This module owns the file layout, the CSV and JSON Lines encodings and the atomic write that
//! makes delivery idempotent: a batch is written to a temporary file beside its final name,
//! synced, then renamed over that name, so a crash leaves either no file or the whole file,
//! and delivering the same batch again replaces the file with the same content. It does not
//! clean up old files.
//!
//! Files are laid out as
//! `<directory>/<activation, '/' replaced by '__'>/run-<run_id:06>-<change>-<sequence:05>.<ext>`,
//! `<change>` being `add`, `remove` or `replace`. The batches of a replace (a `mirror`
//! activation) together hold the whole list; once the last is written, the marker
//! `run-<run_id:06>-replace.complete` is written beside them, holding `batches = N` and
//! `members = M`. A reader takes a run's replace files only once its marker exists: before
//! that the list is incomplete (a replace interrupted and begun again rewrites the same
//! files).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::settings::{Limit, Place, Problems};
use crate::{Batch, BoxFuture, Connector, DeliveryError, Member, Outcome, SettingsError};

/// Connection keys the file connector knows.
const CONNECTION_KEYS: &[&str] = &["directory", "format", "batch_size"];
/// Activation keys the file connector knows.
const ACTIVATION_KEYS: &[&str] = &["format"];
/// `batch_size`, members per file.
const BATCH_SIZE: Limit = Limit {
    default: 100_000,
    max: u64::MAX,
};
/// The column holding the profile key; identifiers may not take this name.
const KEY_COLUMN: &str = "key";

/// How a batch is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// Comma-separated values with a header line, quoted as RFC 4180 describes.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl Format {
    fn parse(problems: &mut Problems, table: &toml::Table, place: Place) -> Option<Format> {
        match problems.string(table, place, "format")?.as_str() {
            "csv" => Some(Format::Csv),
            "jsonl" => Some(Format::Jsonl),
            other => {
                let where_ = place.describe();
                problems.push(
                    "format",
                    format!("expected `csv` or `jsonl` in the {where_}, got `{other}`"),
                );
                None
            }
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
        }
    }
}

/// Writes each batch as a CSV or JSON Lines file into a folder.
///
/// Connection settings: `directory` (required; created when missing; a relative path is taken
/// from the daemon's working directory), `format` (`csv`, the default, or `jsonl`) and
/// `batch_size` (members per file, default 100000). Activation settings: `format`, overriding
/// the connection's.
#[derive(Debug, Clone)]
pub struct FileConnector {
    directory: PathBuf,
    format: Format,
    batch_size: usize,
}

impl FileConnector {
    /// Builds the connector from its connection and activation settings, returning every
    /// problem found.
    pub fn from_settings(
        connection: &toml::Table,
        activation: &toml::Table,
    ) -> Result<Self, Vec<SettingsError>> {
        let mut problems = Problems::default();
        problems.reject_unknown_keys(connection, Place::Connection, CONNECTION_KEYS);
        problems.reject_unknown_keys(activation, Place::Activation, ACTIVATION_KEYS);

        let directory = problems.string(connection, Place::Connection, "directory");
        match &directory {
            None if !connection.contains_key("directory") => problems.push(
                "directory",
                "missing; set it to the folder the batch files are written into",
            ),
            Some(path) if path.is_empty() => problems.push("directory", "must not be empty"),
            _ => {}
        }
        let connection_format = Format::parse(&mut problems, connection, Place::Connection);
        let activation_format = Format::parse(&mut problems, activation, Place::Activation);
        let batch_size = problems.batch_size(connection, BATCH_SIZE);

        problems.finish(|| FileConnector {
            directory: PathBuf::from(directory.unwrap_or_default()),
            format: activation_format
                .or(connection_format)
                .unwrap_or(Format::Csv),
            batch_size,
        })
    }

    /// The folder and file name `batch` is written to.
    fn destination(&self, batch: &Batch) -> Result<(PathBuf, String), DeliveryError> {
        let folder_name = batch.activation.replace('/', "__");
        if folder_name.is_empty()
            || folder_name == "."
            || folder_name == ".."
            || folder_name.contains(['\\', '\0'])
        {
            return Err(DeliveryError::Permanent {
                message: format!(
                    "activation `{}` cannot name a folder; rename the activation",
                    batch.activation.escape_debug()
                ),
            });
        }
        let file_name = format!(
            "run-{:06}-{}-{:05}.{}",
            batch.run_id,
            batch.change.as_str(),
            batch.sequence,
            self.format.extension()
        );
        Ok((self.directory.join(folder_name), file_name))
    }
}

impl Connector for FileConnector {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn max_batch_size(&self) -> usize {
        self.batch_size
    }

    fn replaces_lists(&self) -> bool {
        true
    }

    fn deliver<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<Outcome, DeliveryError>> {
        Box::pin(async move {
            let (folder, file_name) = self.destination(batch)?;
            if batch
                .members
                .iter()
                .any(|m| m.identifiers.contains_key(KEY_COLUMN))
            {
                return Err(DeliveryError::Permanent {
                    message: format!(
                        "an identifier is named `{KEY_COLUMN}`, which clashes with the profile \
                         key column; rename that identifier in the activation"
                    ),
                });
            }

            let format = self.format;
            let members = batch.members.clone();
            let path = folder.join(&file_name);
            let marker = batch
                .replace
                .filter(|_| batch.ends_replace())
                .map(|replace| {
                    (
                        format!("run-{:06}-replace.complete", batch.run_id),
                        format!(
                            "batches = {}\nmembers = {}\n",
                            replace.batches, replace.members
                        ),
                    )
                });
            tokio::task::spawn_blocking(move || {
                write_atomically(&folder, &file_name, |writer| match format {
                    Format::Csv => write_csv(writer, &members),
                    Format::Jsonl => write_jsonl(writer, &members),
                })?;
                match marker {
                    Some((name, text)) => {
                        write_atomically(&folder, &name, |writer| writer.write_all(text.as_bytes()))
                    }
                    None => Ok(()),
                }
            })
            .await
            .map_err(|error| DeliveryError::Retryable {
                message: format!("writing {} did not finish: {error}", path.display()),
            })?
            .map_err(|error| DeliveryError::Retryable {
                message: format!("could not write {}: {error}", path.display()),
            })?;

            tracing::debug!(
                activation = %batch.activation,
                change = batch.change.as_str(),
                sequence = batch.sequence,
                members = batch.members.len(),
                path = %path.display(),
                "batch file written"
            );
            Ok(Outcome {
                accepted: batch.members.iter().map(|m| m.key.clone()).collect(),
                rejected: Vec::new(),
            })
        })
    }
}

/// Writes `folder/file_name` with `write` so that readers only ever see a complete file.
fn write_atomically(
    folder: &Path,
    file_name: &str,
    write: impl FnOnce(&mut BufWriter<tempfile::NamedTempFile>) -> io::Result<()>,
) -> io::Result<()> {
    std::fs::create_dir_all(folder)?;

    let temporary = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(".tmp")
        .tempfile_in(folder)?;
    let mut writer = BufWriter::new(temporary);
    write(&mut writer)?;
    let temporary = writer
        .into_inner()
        .map_err(io::IntoInnerError::into_error)?;
    temporary.as_file().sync_all()?;

    temporary
        .persist(folder.join(file_name))
        .map_err(|error| error.error)?;
    sync_folder(folder)
}

/// Makes the rename durable: on Unix a rename is only on disk once its folder is synced.
#[cfg(unix)]
fn sync_folder(folder: &Path) -> io::Result<()> {
    File::open(folder)?.sync_all()
}

#[cfg(not(unix))]
fn sync_folder(_folder: &Path) -> io::Result<()> {
    Ok(())
}

/// Writes a header `key,<identifier names, sorted>` and one line per member; an identifier
/// the member lacks is an empty field. Lines end with `\n`.
fn write_csv(writer: &mut impl Write, members: &[Member]) -> io::Result<()> {
    let mut names: Vec<&str> = members
        .iter()
        .flat_map(|m| m.identifiers.keys().map(String::as_str))
        .collect();
    names.sort_unstable();
    names.dedup();

    write_csv_line(
        writer,
        std::iter::once(KEY_COLUMN).chain(names.iter().copied()),
    )?;
    for member in members {
        let values = names
            .iter()
            .map(|name| member.identifiers.get(*name).map_or("", String::as_str));
        write_csv_line(writer, std::iter::once(member.key.as_str()).chain(values))?;
    }
    Ok(())
}

fn write_csv_line<'a>(
    writer: &mut impl Write,
    fields: impl Iterator<Item = &'a str>,
) -> io::Result<()> {
    for (index, field) in fields.enumerate() {
        if index > 0 {
            writer.write_all(b",")?;
        }
        write_csv_field(writer, field)?;
    }
    writer.write_all(b"\n")
}

/// Writes one field, in double quotes with inner quotes doubled when it holds a comma, a
/// quote, CR or LF (RFC 4180), as is otherwise.
fn write_csv_field(writer: &mut impl Write, field: &str) -> io::Result<()> {
    if !field.contains([',', '"', '\r', '\n']) {
        return writer.write_all(field.as_bytes());
    }
    writer.write_all(b"\"")?;
    writer.write_all(field.replace('"', "\"\"").as_bytes())?;
    writer.write_all(b"\"")
}

/// One JSON Lines record: the key first, then the identifiers by name.
#[derive(serde::Serialize)]
struct JsonRecord<'a> {
    key: &'a str,
    #[serde(flatten)]
    identifiers: &'a std::collections::BTreeMap<String, String>,
}

/// Writes one object per member: `{"key":"..","<identifier>":".."}`.
fn write_jsonl(writer: &mut impl Write, members: &[Member]) -> io::Result<()> {
    for member in members {
        let record = JsonRecord {
            key: &member.key,
            identifiers: &member.identifiers,
        };
        serde_json::to_writer(&mut *writer, &record)?;
        writer.write_all(b"\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(key: &str, identifiers: &[(&str, &str)]) -> Member {
        Member {
            key: key.into(),
            identifiers: identifiers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn csv(members: &[Member]) -> String {
        let mut out = Vec::new();
        write_csv(&mut out, members).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn csv_quotes_fields_with_a_line_break() {
        let members = [member("1", &[("note", "two\r\nlines"), ("plain", "a b")])];

        assert_eq!(csv(&members), "key,note,plain\n1,\"two\r\nlines\",a b\n");
    }

    #[test]
    fn csv_of_no_members_is_a_header_alone() {
        assert_eq!(csv(&[]), "key\n");
    }

    #[test]
    fn an_activation_that_cannot_name_a_folder_is_a_permanent_failure() {
        let connector = FileConnector {
            directory: "/tmp".into(),
            format: Format::Csv,
            batch_size: 10,
        };
        let batch = Batch {
            run_id: 1,
            activation: "..".into(),
            change: crate::Change::Add,
            sequence: 0,
            members: vec![],
            replace: None,
        };

        let error = connector.destination(&batch).unwrap_err();

        assert_eq!(
            error,
            DeliveryError::Permanent {
                message: "activation `..` cannot name a folder; rename the activation".into()
            }
        );
    }
}
