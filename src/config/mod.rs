//! Loading and validating what an operator writes.
//!
//! This module owns `config.toml` (the daemon: data folder, DuckDB file, HTTP listener,
//! connections) and, through its submodules, `pipelines/<name>/pipeline.toml` (one master
//! segment) and `pipelines/<name>/segments/**.toml` (one segment per file). Loading reads raw
//! TOML into structs that reject unknown keys, then checks everything it can without data:
//! types, names, references, cycles, connector settings. Every problem found is collected as a
//! [`Problem`] naming the file and line, so `segmentd validate` can report them all at once.
//! A file that cannot be used (one that does not parse, say) does not stop the others being
//! checked: what needs it is skipped, and [`Problems`] says what was.
//!
//! It does not open DuckDB, read source data or talk to any platform.

pub mod pipeline;
pub mod segment;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

pub use pipeline::{Pipeline, TableDef};
pub use segment::{ActivationDef, Mode, SegmentDef};

/// One problem in the configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file at fault.
    pub file: PathBuf,
    /// The 1-based line in that file, when the problem has one.
    pub line: Option<usize>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// Every problem found while loading, in the order found, and the checks that could not be
/// made because of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct Problems {
    /// The problems.
    pub problems: Vec<Problem>,
    /// Checks skipped because a file they need has problems.
    pub skipped: Vec<Skipped>,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        writeln!(
            f,
            "{count} problem{} in the configuration:",
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            writeln!(f, "  {problem}")?;
        }
        if !self.skipped.is_empty() {
            writeln!(f, "not checked until those are fixed:")?;
            for skipped in &self.skipped {
                writeln!(f, "  {skipped}")?;
            }
        }
        Ok(())
    }
}

/// Checks that were not made because a file they need has problems.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The file with problems.
    pub file: PathBuf,
    /// Why it cannot be used and what was not checked.
    pub message: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.file.display(), self.message)
    }
}

/// A source file's text with its path, for turning byte offsets into lines.
pub(crate) struct SourceText<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl SourceText<'_> {
    /// The 1-based line holding byte `offset`.
    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    /// A problem at the start of a spanned value.
    pub fn problem_at<T>(&self, spanned: &Spanned<T>, message: impl Into<String>) -> Problem {
        self.problem_at_offset(spanned.span().start, message)
    }

    /// A problem at a byte offset.
    pub fn problem_at_offset(&self, offset: usize, message: impl Into<String>) -> Problem {
        Problem {
            file: self.path.to_path_buf(),
            line: Some(self.line_of(offset)),
            message: message.into(),
        }
    }

    /// A problem about the whole file.
    pub fn problem(&self, message: impl Into<String>) -> Problem {
        Problem {
            file: self.path.to_path_buf(),
            line: None,
            message: message.into(),
        }
    }

    /// Parses the text as TOML into `T`, turning a parse error into a located problem.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, Problem> {
        toml::from_str(self.text).map_err(|err| {
            let message = err.message().trim_end().to_string();
            match err.span() {
                Some(span) => self.problem_at_offset(span.start, message),
                None => self.problem(message),
            }
        })
    }
}

/// Reads a file for loading, as a problem when it cannot be read.
pub(crate) fn read_text(path: &Path) -> Result<String, Problem> {
    std::fs::read_to_string(path).map_err(|err| Problem {
        file: path.to_path_buf(),
        line: None,
        message: format!("cannot read the file: {err}"),
    })
}

/// `config.toml` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemonConfig {
    /// Folder for segmentd's own files (the DuckDB file, exports), relative to `config.toml`.
    #[serde(default = "default_data_dir")]
    data_dir: String,
    /// The DuckDB file; relative paths are relative to `config.toml`'s folder.
    database: Option<String>,
    /// Folder holding one sub-folder per pipeline.
    #[serde(default = "default_pipelines_dir")]
    pipelines_dir: String,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    duckdb: RawDuckdb,
    /// Connections by name; each has `type` and the connector's own settings.
    #[serde(default)]
    connections: indexmap::IndexMap<String, Spanned<toml::Table>>,
}

fn default_data_dir() -> String {
    "var".into()
}

fn default_pipelines_dir() -> String {
    "pipelines".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    /// Address the HTTP API listens on.
    #[serde(default = "default_listen_spanned")]
    listen: Spanned<String>,
}

impl Default for RawHttp {
    fn default() -> Self {
        RawHttp {
            listen: default_listen_spanned(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8640".into()
}

fn default_listen_spanned() -> Spanned<String> {
    Spanned::new(0..0, default_listen())
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDuckdb {
    /// DuckDB's `memory_limit`, for example `"4GB"`.
    memory_limit: Option<Spanned<String>>,
    /// DuckDB's worker threads.
    threads: Option<Spanned<u32>>,
}

/// The daemon's validated settings.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The `config.toml` this came from.
    pub path: PathBuf,
    /// Folder for segmentd's own files.
    pub data_dir: PathBuf,
    /// The DuckDB file.
    pub database: PathBuf,
    /// Folder holding the pipelines.
    pub pipelines_dir: PathBuf,
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// DuckDB `memory_limit` (default `"4GB"`).
    pub memory_limit: String,
    /// DuckDB worker threads (default 2).
    pub threads: u32,
    /// Connections by name.
    pub connections: BTreeMap<String, Connection>,
}

/// Credentials and settings for one platform account.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The connection's name in `config.toml`.
    pub name: String,
    /// The connector type (`file`, `webhook`, ...).
    pub kind: String,
    /// The connector's settings, without `type`; paths already resolved.
    pub settings: toml::Table,
    /// Secrets read from the environment, by setting name without `_env`.
    pub secrets: BTreeMap<String, String>,
    /// How deliveries through this connection are retried (`[connections.<name>.retry]`).
    pub retry: segmentd_connectors::RetryPolicy,
    /// The client-side request limit shared by every activation of this connection
    /// (`[connections.<name>.rate_limit]`), if one is set.
    pub rate_limit: Option<segmentd_connectors::RateLimit>,
    /// Line of the connection's table in `config.toml`.
    pub line: usize,
    /// The problems of the connection's own settings, reported at its line; an activation
    /// through it does not report them again.
    pub problems: Vec<segmentd_connectors::SettingsError>,
    /// The `<secret>_env` settings whose secret could not be read, reported at the
    /// connection's line; what a connector says about them is not reported again.
    pub unread_secrets: BTreeSet<String>,
}

impl Connection {
    /// Whether a connector's settings problem is one already reported at the connection.
    pub fn reported(&self, error: &segmentd_connectors::SettingsError) -> bool {
        self.unread_secrets.contains(&error.field) || self.problems.contains(error)
    }
}

/// Everything an operator configured: the daemon and every pipeline.
#[derive(Debug, Clone)]
pub struct Config {
    /// The daemon's settings.
    pub daemon: DaemonConfig,
    /// Pipelines by name.
    pub pipelines: BTreeMap<String, Pipeline>,
}

impl Config {
    /// Loads `config.toml` and every pipeline under its pipelines folder, collecting every
    /// problem found.
    pub fn load(config_path: &Path) -> Result<Config, Problems> {
        let mut problems = Vec::new();
        let mut skipped = Vec::new();
        let (daemon, pipelines_dir) = match load_daemon(config_path, &mut problems) {
            DaemonLoad::Loaded(daemon) => {
                let dir = daemon.pipelines_dir.clone();
                (Some(daemon), dir)
            }
            // The pipelines do not need config.toml, only their activations do: check them
            // all the same, where config.toml seems to say they are.
            DaemonLoad::Unparsed { pipelines_dir } => {
                skipped.push(Skipped {
                    file: config_path.to_path_buf(),
                    message: format!(
                        "does not parse, so the activations of the pipelines in {} were not \
                         checked against its connections",
                        pipelines_dir.display()
                    ),
                });
                (None, pipelines_dir)
            }
            DaemonLoad::Unreadable => {
                return Err(Problems { problems, skipped });
            }
        };

        let mut pipelines = BTreeMap::new();
        match pipeline_dirs(&pipelines_dir) {
            Ok(dirs) => {
                for dir in dirs {
                    let loaded = pipeline::load(&dir, daemon.as_ref(), &mut problems, &mut skipped);
                    if let Some(pipeline) = loaded {
                        pipelines.insert(pipeline.name.clone(), pipeline);
                    }
                }
            }
            Err(problem) => problems.push(problem),
        }

        match daemon {
            Some(daemon) if problems.is_empty() => Ok(Config { daemon, pipelines }),
            _ => Err(Problems { problems, skipped }),
        }
    }

    /// The pipeline called `name`, or an error listing the pipelines there are.
    pub fn pipeline(&self, name: &str) -> anyhow::Result<&Pipeline> {
        self.pipelines.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.pipelines.keys().map(String::as_str).collect();
            anyhow::anyhow!(
                "no pipeline `{name}`; pipelines configured: {}",
                known.join(", ")
            )
        })
    }
}

/// The pipeline folders (those holding a `pipeline.toml`), sorted by name.
fn pipeline_dirs(pipelines_dir: &Path) -> Result<Vec<PathBuf>, Problem> {
    let entries = std::fs::read_dir(pipelines_dir).map_err(|err| Problem {
        file: pipelines_dir.to_path_buf(),
        line: None,
        message: format!("cannot read the pipelines folder: {err}"),
    })?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.join("pipeline.toml").is_file())
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// What loading `config.toml` gave.
enum DaemonLoad {
    /// The daemon's settings (they may still have had problems).
    Loaded(DaemonConfig),
    /// The file does not parse; the pipelines are probably in this folder.
    Unparsed { pipelines_dir: PathBuf },
    /// The file cannot be read.
    Unreadable,
}

/// The folder `config.toml`'s relative paths are relative to.
fn base_dir(path: &Path) -> PathBuf {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    }
}

/// Where the pipelines are, read from a `config.toml` that does not parse as a whole: its
/// own top-level `pipelines_dir = "..."` line when that line parses, else the default.
fn pipelines_dir_of_unparsed(base: &Path, text: &str) -> PathBuf {
    let written = text
        .lines()
        .take_while(|line| !line.trim_start().starts_with('['))
        .filter(|line| line.trim_start().starts_with("pipelines_dir"))
        .find_map(|line| {
            let table: toml::Table = line.parse().ok()?;
            table.get("pipelines_dir")?.as_str().map(str::to_string)
        });
    base.join(written.unwrap_or_else(default_pipelines_dir))
}

fn load_daemon(path: &Path, problems: &mut Vec<Problem>) -> DaemonLoad {
    let text = match read_text(path) {
        Ok(text) => text,
        Err(problem) => {
            problems.push(problem);
            return DaemonLoad::Unreadable;
        }
    };
    let base = base_dir(path);
    let source = SourceText { path, text: &text };
    let raw: RawDaemonConfig = match source.parse() {
        Ok(raw) => raw,
        Err(problem) => {
            problems.push(problem);
            return DaemonLoad::Unparsed {
                pipelines_dir: pipelines_dir_of_unparsed(&base, &text),
            };
        }
    };

    let data_dir = base.join(&raw.data_dir);
    let database = match &raw.database {
        Some(database) => base.join(database),
        None => data_dir.join("segmentd.duckdb"),
    };

    let listen = match raw.http.listen.get_ref().parse::<SocketAddr>() {
        Ok(listen) => listen,
        Err(_) => {
            problems.push(source.problem_at(
                &raw.http.listen,
                format!(
                    "http.listen `{}` is not an address with a port, such as \"127.0.0.1:8640\"",
                    raw.http.listen.get_ref()
                ),
            ));
            default_listen()
                .parse()
                .expect("the default listen address parses")
        }
    };

    let memory_limit = raw
        .duckdb
        .memory_limit
        .as_ref()
        .map(|m| m.get_ref().clone());
    if let Some(limit) = &raw.duckdb.memory_limit {
        let ok = limit
            .get_ref()
            .trim_end_matches(|c: char| c.is_ascii_alphabetic());
        if ok.is_empty() || ok.parse::<f64>().is_err() {
            problems.push(source.problem_at(
                limit,
                "duckdb.memory_limit must be a size such as \"4GB\" or \"512MB\"",
            ));
        }
    }
    let threads = raw
        .duckdb
        .threads
        .as_ref()
        .map(|t| *t.get_ref())
        .unwrap_or(2);
    if let Some(spanned) = &raw.duckdb.threads
        && threads == 0
    {
        problems.push(source.problem_at(spanned, "duckdb.threads must be 1 or more"));
    }

    let mut connections = BTreeMap::new();
    for (name, table) in raw.connections {
        if let Some(connection) = load_connection(&source, &base, &name, &table, problems) {
            connections.insert(name, connection);
        }
    }

    DaemonLoad::Loaded(DaemonConfig {
        path: path.to_path_buf(),
        data_dir,
        database,
        pipelines_dir: base.join(&raw.pipelines_dir),
        listen,
        memory_limit: memory_limit.unwrap_or_else(|| "4GB".into()),
        threads,
        connections,
    })
}

/// Checks one `[connections.<name>]` table: its type, its secrets (settings ending in `_env`
/// name environment variables, read now), and the connector's own settings.
fn load_connection(
    source: &SourceText<'_>,
    base: &Path,
    name: &str,
    table: &Spanned<toml::Table>,
    problems: &mut Vec<Problem>,
) -> Option<Connection> {
    let line = source.line_of(table.span().start);
    let at = |message: String| Problem {
        file: source.path.to_path_buf(),
        line: Some(line),
        message: format!("connection `{name}`: {message}"),
    };

    let mut settings = table.get_ref().clone();
    let kind = match settings.remove("type") {
        Some(toml::Value::String(kind)) => kind,
        Some(_) => {
            problems.push(at("`type` must be a string".into()));
            return None;
        }
        None => {
            let kinds = segmentd_connectors::KINDS.join(", ");
            problems.push(at(format!("`type` is missing; one of: {kinds}")));
            return None;
        }
    };

    let retry = match settings.remove("retry") {
        Some(retry) => match retry.try_into::<segmentd_connectors::RetryPolicy>() {
            Ok(retry) => retry,
            Err(err) => {
                problems.push(at(format!("retry: {}", err.message().trim_end())));
                segmentd_connectors::RetryPolicy::default()
            }
        },
        None => segmentd_connectors::RetryPolicy::default(),
    };

    let rate_limit = match settings.remove("rate_limit") {
        Some(limit) => match limit.try_into::<segmentd_connectors::RateLimitSettings>() {
            Ok(limit) => match segmentd_connectors::RateLimit::new(limit) {
                Ok(limit) => Some(limit),
                Err(message) => {
                    problems.push(at(format!("rate_limit: {message}")));
                    None
                }
            },
            Err(err) => {
                problems.push(at(format!("rate_limit: {}", err.message().trim_end())));
                None
            }
        },
        None => None,
    };

    // Each secret is read here and a missing one reported here, once, whatever else checks it.
    let mut secrets = BTreeMap::new();
    let mut unread_secrets = BTreeSet::new();
    for (key, value) in &settings {
        let Some(secret) = key.strip_suffix("_env") else {
            continue;
        };
        let Some(variable) = value.as_str() else {
            problems.push(at(format!(
                "`{key}` must be the name of an environment variable, such as \
                 \"SEGMENTD_{}\"",
                secret.to_ascii_uppercase()
            )));
            unread_secrets.insert(key.clone());
            continue;
        };
        let state = match std::env::var(variable) {
            Ok(value) if !value.is_empty() => {
                secrets.insert(secret.to_string(), value);
                continue;
            }
            Ok(_) => "is empty",
            Err(std::env::VarError::NotPresent) => "is not set",
            Err(std::env::VarError::NotUnicode(_)) => "is not valid UTF-8",
        };
        problems.push(at(format!(
            "`{key}` names the environment variable `{variable}`, which {state} in segmentd's \
             environment; set it to the connection's {} before starting segmentd (for example \
             `export {variable}=...` in the shell that starts it, or \
             `Environment={variable}=...` in its systemd unit)",
            secret.replace('_', " ")
        )));
        unread_secrets.insert(key.clone());
    }

    if let Some(toml::Value::String(directory)) = settings.get("directory") {
        let resolved = base.join(directory).to_string_lossy().into_owned();
        settings.insert("directory".into(), toml::Value::String(resolved));
    }

    // The connector checks its own settings; activation settings are checked per segment.
    let connection_problems =
        match segmentd_connectors::check_connection(&kind, &settings, &secrets) {
            Ok(()) => Vec::new(),
            Err(errors) => errors,
        };
    for error in &connection_problems {
        if !unread_secrets.contains(&error.field) {
            problems.push(at(error.to_string()));
        }
    }

    Some(Connection {
        name: name.to_string(),
        kind,
        settings,
        secrets,
        retry,
        rate_limit,
        line,
        problems: connection_problems,
        unread_secrets,
    })
}

/// Checks that a name is a lower-case identifier usable in SQL and file names.
pub(crate) fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}
