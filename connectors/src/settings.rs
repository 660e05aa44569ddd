//! Reading connector settings out of TOML tables.
//!
//! Connections and activations hand their settings to a connector as plain TOML tables. This
//! module owns the checks every connector repeats on them: unknown keys, value types and
//! integer ranges, each reported as a [`SettingsError`] naming the key, and all of them
//! collected rather than stopping at the first. It also owns the settings most connectors
//! share and read the same way: secrets named by `<secret>_env`, `base_url`, `batch_size`,
//! `timeout_seconds` and the HTTP client built from it, numeric platform ids, and the
//! reading of a connector's two tables into the connector ([`build`], [`check`]). What a
//! value means, its default and its bounds are up to the connector.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::time::Duration;

use reqwest::Url;

use crate::SettingsError;
use crate::http::{self, Secret};

/// Resolved secrets by name (`access_token`, `api_key`...), as the engine passes them.
pub(crate) type Secrets = BTreeMap<String, String>;

/// Reads a connector's connection and activation settings with its own readers and builds it
/// with `new`; every problem either reader found otherwise. A reader gives `None` when any of
/// its settings is wrong, and says which in the problems.
pub(crate) fn build<C, A, T>(
    connection: &toml::Table,
    activation: &toml::Table,
    secrets: &BTreeMap<String, String>,
    read_connection: impl FnOnce(&mut Problems, &toml::Table, &Secrets) -> Option<C>,
    read_activation: impl FnOnce(&mut Problems, &toml::Table) -> Option<A>,
    new: impl FnOnce(C, A) -> T,
) -> Result<T, Vec<SettingsError>> {
    let mut problems = Problems::default();
    let connection = read_connection(&mut problems, connection, secrets);
    let activation = read_activation(&mut problems, activation);
    problems.finish(|| {
        let connection = connection.expect("connection settings when there are no problems");
        let activation = activation.expect("activation settings when there are no problems");
        new(connection, activation)
    })
}

/// Checks a connection's settings alone with the connector's reader, as when a connection is
/// loaded before any activation uses it; returns every problem found.
pub(crate) fn check<C>(
    connection: &toml::Table,
    secrets: &BTreeMap<String, String>,
    read_connection: impl FnOnce(&mut Problems, &toml::Table, &Secrets) -> Option<C>,
) -> Result<(), Vec<SettingsError>> {
    let mut problems = Problems::default();
    read_connection(&mut problems, connection, secrets);
    problems.finish(|| ())
}

/// The default and the largest value of a whole-number setting, whose smallest value is 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limit {
    /// The value when the setting is absent.
    pub(crate) default: u64,
    /// The largest value accepted.
    pub(crate) max: u64,
}

/// What an identifier table held: its `(name, member identifier)` pairs in name order, and
/// whether every entry was right.
#[derive(Debug)]
pub(crate) struct Mapped<K> {
    /// The entries that were right.
    pub(crate) pairs: Vec<(K, String)>,
    /// False when any entry, or the value itself, was wrong (the problems say which).
    pub(crate) ok: bool,
}

impl<K> Mapped<K> {
    /// The pairs when every entry was right and there is at least one; a table without any
    /// is the problem `empty` of `key`.
    pub(crate) fn finish(
        self,
        problems: &mut Problems,
        key: &str,
        empty: &str,
    ) -> Option<Vec<(K, String)>> {
        if self.ok && self.pairs.is_empty() {
            problems.push(key, empty);
            return None;
        }
        self.ok.then_some(self.pairs)
    }
}

/// A credential the connection names by `<name>_env` and the connector sends in an HTTP
/// header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeaderSecret {
    /// The secret's name: `<name>_env` names the environment variable holding it, and the
    /// engine passes its value as the `<name>` secret.
    pub(crate) name: &'static str,
    /// What the variable must hold, for the messages when it is missing or not set.
    pub(crate) holds: &'static str,
    /// What the value is called in messages, such as `the API key`.
    pub(crate) called: &'static str,
    /// The start every such value has, with the message for one that lacks it, if the
    /// platform's values have one.
    pub(crate) prefix: Option<(&'static str, &'static str)>,
}

/// Which table a setting was read from, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// The `[connections.<name>]` table of `config.toml`.
    Connection,
    /// The `[activations.settings]` table of a segment file.
    Activation,
}

impl Place {
    /// The table's name in messages: `connection settings` or `activation settings`.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Place::Connection => "connection settings",
            Place::Activation => "activation settings",
        }
    }
}

/// The settings problems found so far in one connector's tables.
#[derive(Debug, Default)]
pub(crate) struct Problems(Vec<SettingsError>);

impl Problems {
    /// Records a problem with `field`.
    pub(crate) fn push(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(SettingsError {
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// Returns `value` if no problem was found, every problem otherwise.
    pub(crate) fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, Vec<SettingsError>> {
        if self.0.is_empty() {
            Ok(value())
        } else {
            Err(self.0)
        }
    }

    /// Records every key of `table` that is not in `known`.
    pub(crate) fn reject_unknown_keys(
        &mut self,
        table: &toml::Table,
        place: Place,
        known: &[&str],
    ) {
        // Sorted, so the problems come in the same order however the table keeps its keys.
        let mut unknown: Vec<&String> = table
            .keys()
            .filter(|key| !known.contains(&key.as_str()))
            .collect();
        unknown.sort();
        for key in unknown {
            let known = if known.is_empty() {
                "this connection type takes none".to_owned()
            } else {
                format!("known keys: {}", known.join(", "))
            };
            self.push(
                key,
                format!("unknown key in the {}; {known}", place.describe()),
            );
        }
    }

    /// `value` when it can travel in an HTTP header; otherwise records a problem with `field`,
    /// without quoting the value, and gives `None`.
    pub(crate) fn header_safe(&mut self, field: &str, what: &str, value: String) -> Option<String> {
        if reqwest::header::HeaderValue::from_str(&value).is_ok() {
            return Some(value);
        }
        self.push(
            field,
            format!(
                "{what} holds characters an HTTP header cannot carry, such as a trailing newline; \
                 check the environment variable's value"
            ),
        );
        None
    }

    /// The string at `key`, if present; a value of another type is a problem.
    pub(crate) fn string(
        &mut self,
        table: &toml::Table,
        place: Place,
        key: &str,
    ) -> Option<String> {
        match table.get(key)? {
            toml::Value::String(value) => Some(value.clone()),
            other => {
                let found = other.type_str();
                self.push(
                    key,
                    format!(
                        "expected a string in the {}, found {found}",
                        place.describe()
                    ),
                );
                None
            }
        }
    }

    /// The integer at `key`, if present and within `range`; anything else is a problem.
    pub(crate) fn integer(
        &mut self,
        table: &toml::Table,
        place: Place,
        key: &str,
        range: RangeInclusive<i64>,
    ) -> Option<i64> {
        let where_ = place.describe();
        match table.get(key)? {
            toml::Value::Integer(value) if range.contains(value) => Some(*value),
            toml::Value::Integer(value) => {
                let (low, high) = (range.start(), range.end());
                self.push(
                    key,
                    format!("must be between {low} and {high} in the {where_}, got {value}"),
                );
                None
            }
            other => {
                let found = other.type_str();
                self.push(
                    key,
                    format!("expected an integer in the {where_}, found {found}"),
                );
                None
            }
        }
    }
    /// The `http` or `https` URL with a host at `key`, if present; anything else is a problem.
    pub(crate) fn http_url(
        &mut self,
        table: &toml::Table,
        place: Place,
        key: &str,
    ) -> Option<reqwest::Url> {
        let text = self.string(table, place, key)?;
        match reqwest::Url::parse(&text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Some(url),
            Ok(url) => {
                let scheme = url.scheme();
                self.push(
                    key,
                    format!("must be an http or https URL with a host, got `{scheme}:`"),
                );
                None
            }
            Err(error) => {
                self.push(key, format!("not a valid URL: {error}"));
                None
            }
        }
    }

    /// The secret resolved from the environment variable named by `<secret>_env` in the
    /// connection settings. A missing `<secret>_env` is a problem explained by `purpose`
    /// (what the variable must hold); a variable that was not set is another.
    pub(crate) fn secret(
        &mut self,
        connection: &toml::Table,
        secrets: &BTreeMap<String, String>,
        secret: &str,
        purpose: &str,
    ) -> Option<String> {
        let key = format!("{secret}_env");
        if !connection.contains_key(&key) {
            self.push(
                &key,
                format!(
                    "missing; set it to the name of the environment variable holding {purpose}"
                ),
            );
            return None;
        }
        let variable = self.string(connection, Place::Connection, &key)?;
        match secrets.get(secret) {
            Some(value) if !value.is_empty() => Some(value.clone()),
            _ => {
                self.push(
                    &key,
                    format!(
                        "the environment variable `{variable}` is not set; export it with {purpose}"
                    ),
                );
                None
            }
        }
    }

    /// The secret `spec` describes (see [`Problems::secret`]), checked for its prefix, if it
    /// has one, and then for characters an HTTP header cannot carry.
    pub(crate) fn header_secret(
        &mut self,
        connection: &toml::Table,
        secrets: &BTreeMap<String, String>,
        spec: HeaderSecret,
    ) -> Option<Secret> {
        let field = format!("{}_env", spec.name);
        let value = self.secret(connection, secrets, spec.name, spec.holds)?;
        if let Some((prefix, message)) = spec.prefix
            && !value.starts_with(prefix)
        {
            self.push(&field, message);
            return None;
        }
        self.header_safe(&field, spec.called, value).map(Secret)
    }

    /// The whole number at `key` of the connection settings, from 1 to `limit.max`, or
    /// `limit.default` when it is absent or wrong (a wrong one is a problem).
    pub(crate) fn count(&mut self, table: &toml::Table, key: &str, limit: Limit) -> u64 {
        let max = i64::try_from(limit.max).unwrap_or(i64::MAX);
        self.integer(table, Place::Connection, key, 1..=max)
            .and_then(|value| u64::try_from(value).ok())
            .unwrap_or(limit.default)
    }

    /// `batch_size`, members per batch, within `limit`.
    pub(crate) fn batch_size(&mut self, table: &toml::Table, limit: Limit) -> usize {
        let size = self.count(table, "batch_size", limit);
        usize::try_from(size).unwrap_or(usize::MAX)
    }

    /// The whole number of seconds at `key` of the connection settings, within `limit`.
    pub(crate) fn seconds(&mut self, table: &toml::Table, key: &str, limit: Limit) -> Duration {
        Duration::from_secs(self.count(table, key, limit))
    }

    /// `base_url`, an http or https URL, or `default` when it is not set.
    pub(crate) fn base_url(&mut self, table: &toml::Table, default: &str) -> Option<Url> {
        self.http_url_or(table, "base_url", default)
    }

    /// The http or https URL at `key` of the connection settings, or `default` when it is not
    /// set.
    pub(crate) fn http_url_or(
        &mut self,
        table: &toml::Table,
        key: &str,
        default: &str,
    ) -> Option<Url> {
        match table.contains_key(key) {
            true => self.http_url(table, Place::Connection, key),
            false => Some(Url::parse(default).expect("a default URL parses")),
        }
    }

    /// The HTTP client, its request timeout `timeout_seconds` within `timeout`; a client that
    /// cannot be set up is a problem of `url_key`, the setting naming where it connects.
    pub(crate) fn http_client(
        &mut self,
        table: &toml::Table,
        url_key: &str,
        timeout: Limit,
    ) -> Option<reqwest::Client> {
        let timeout = self.seconds(table, "timeout_seconds", timeout);
        match http::client(timeout) {
            Ok(client) => Some(client),
            Err(error) => {
                self.push(
                    url_key,
                    format!("the HTTP client cannot be set up: {error}"),
                );
                None
            }
        }
    }

    /// The table at `key` of the activation settings mapping the names `parse` knows to member
    /// identifiers, or `None` when it is absent. A value that is not a table is a problem
    /// (`example` shows one), and so is each entry whose name `parse` does not know (`unknown`
    /// says which are known) or whose value is not a non-empty string, each under
    /// `<key>.<name>`.
    pub(crate) fn identifier_table<K: Ord + Copy>(
        &mut self,
        table: &toml::Table,
        key: &str,
        example: &str,
        parse: impl Fn(&str) -> Option<K>,
        unknown: &str,
    ) -> Option<Mapped<K>> {
        let value = table.get(key)?;
        let Some(entries) = value.as_table() else {
            let found = value.type_str();
            self.push(
                key,
                format!("expected a table such as {example}, found {found}"),
            );
            return Some(Mapped {
                pairs: Vec::new(),
                ok: false,
            });
        };
        let mut mapped = Mapped {
            pairs: Vec::new(),
            ok: true,
        };
        // Sorted by name, so problems come in the same order whatever map the table is.
        let mut entries: Vec<_> = entries.iter().collect();
        entries.sort_by_key(|(name, _)| *name);
        for (name, identifier) in entries {
            let identifier = identifier.as_str().filter(|text| !text.is_empty());
            match (parse(name), identifier) {
                (Some(parsed), Some(identifier)) => {
                    mapped.pairs.push((parsed, identifier.to_owned()))
                }
                (None, _) => {
                    mapped.ok = false;
                    self.push(&format!("{key}.{name}"), unknown);
                }
                (Some(_), None) => {
                    mapped.ok = false;
                    self.push(
                        &format!("{key}.{name}"),
                        "expected the name of a member identifier, as a non-empty string",
                    );
                }
            }
        }
        mapped.pairs.sort_by_key(|(parsed, _)| *parsed);
        Some(mapped)
    }

    /// The platform id at `key`, an integer above 0 or a string of digits, as digits. When
    /// absent, the problem is `missing`; when of another form, `wrong`.
    pub(crate) fn numeric_id(
        &mut self,
        table: &toml::Table,
        key: &str,
        missing: &str,
        wrong: &str,
    ) -> Option<String> {
        match table.get(key) {
            None => {
                self.push(key, missing);
                None
            }
            Some(toml::Value::Integer(id)) if *id > 0 => Some(id.to_string()),
            Some(toml::Value::String(id))
                if !id.is_empty() && id.bytes().all(|byte| byte.is_ascii_digit()) =>
            {
                Some(id.clone())
            }
            Some(_) => {
                self.push(key, wrong);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().expect("test TOML parses")
    }

    #[test]
    fn unknown_keys_are_each_named_with_the_known_ones() {
        let mut problems = Problems::default();
        let settings = table("path = 'a'\nformat = 'csv'\nmode = 1");

        problems.reject_unknown_keys(&settings, Place::Connection, &["directory", "format"]);

        let errors = problems.finish(|| ()).unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["mode", "path"]);
        assert_eq!(
            errors[0].message,
            "unknown key in the connection settings; known keys: directory, format"
        );
    }

    #[test]
    fn a_string_of_the_wrong_type_is_reported_with_the_type_found() {
        let mut problems = Problems::default();

        let value = problems.string(&table("url = 5"), Place::Activation, "url");

        assert_eq!(value, None);
        let errors = problems.finish(|| ()).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "url: expected a string in the activation settings, found integer"
        );
    }

    #[test]
    fn an_integer_outside_its_range_is_reported_with_the_range() {
        let mut problems = Problems::default();
        let settings = table("batch_size = 0\ntimeout_seconds = 30");

        let size = problems.integer(&settings, Place::Connection, "batch_size", 1..=10);
        let timeout = problems.integer(&settings, Place::Connection, "timeout_seconds", 1..=60);

        assert_eq!((size, timeout), (None, Some(30)));
        let errors = problems.finish(|| ()).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "batch_size: must be between 1 and 10 in the connection settings, got 0"
        );
    }

    #[test]
    fn a_count_outside_its_limit_is_a_problem_and_an_absent_one_takes_the_default() {
        let mut problems = Problems::default();
        let limit = Limit {
            default: 60,
            max: 300,
        };
        let settings = table("timeout_seconds = 301\nbatch_size = 5");

        let timeout = problems.seconds(&settings, "timeout_seconds", limit);
        let size = problems.batch_size(&settings, limit);
        let absent = problems.count(&settings, "job_wait_seconds", limit);

        assert_eq!((timeout, size, absent), (Duration::from_secs(60), 5, 60));
        let errors = problems.finish(|| ()).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "timeout_seconds: must be between 1 and 300 in the connection settings, got 301"
        );
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn a_header_secret_is_checked_for_its_prefix_then_for_header_characters() {
        let spec = HeaderSecret {
            name: "api_key",
            holds: "an API key",
            called: "the API key",
            prefix: Some(("SG.", "the API key does not start with `SG.`")),
        };
        let settings = table("api_key_env = 'KEY'");
        let read = |value: &str| {
            let secrets = BTreeMap::from([("api_key".to_owned(), value.to_owned())]);
            let mut problems = Problems::default();
            let secret = problems.header_secret(&settings, &secrets, spec);
            let messages: Vec<String> = match problems.finish(|| ()) {
                Ok(()) => Vec::new(),
                Err(errors) => errors.iter().map(ToString::to_string).collect(),
            };
            (secret.map(|secret| secret.expose().to_owned()), messages)
        };

        assert_eq!(read("SG.abc"), (Some("SG.abc".to_owned()), vec![]));
        assert_eq!(
            read("pk_abc\n"),
            (
                None,
                vec!["api_key_env: the API key does not start with `SG.`".to_owned()]
            )
        );
        let (secret, messages) = read("SG.abc\n");
        assert_eq!(secret, None);
        assert!(
            messages[0].starts_with("api_key_env: the API key holds characters"),
            "{messages:?}"
        );
    }

    #[test]
    fn numeric_ids_are_positive_integers_or_strings_of_digits() {
        let mut problems = Problems::default();
        let settings = table("a = 123\nb = '0042'\nc = -1\nd = '12a'");
        let mut id = |key: &str| problems.numeric_id(&settings, key, "missing", "digits only");

        let ids = [id("a"), id("b"), id("c"), id("d"), id("e")];

        assert_eq!(
            ids,
            [
                Some("123".to_owned()),
                Some("0042".to_owned()),
                None,
                None,
                None
            ]
        );
        let errors = problems.finish(|| ()).unwrap_err();
        let said: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(said, ["c: digits only", "d: digits only", "e: missing"]);
    }

    #[test]
    fn an_identifier_table_names_each_wrong_entry_and_sorts_the_right_ones() {
        let parse = |name: &str| ["PHONE", "EMAIL"].iter().position(|known| *known == name);
        let mut problems = Problems::default();
        let right = table("[schema]\nEMAIL = 'mail'\nPHONE = 'tel'");
        let wrong = table("[schema]\nFAX = 'fax'\nEMAIL = ''");
        let absent = table("");

        let read = problems
            .identifier_table(&right, "schema", "{}", parse, "unknown")
            .unwrap();
        let refused = problems
            .identifier_table(&wrong, "schema", "{}", parse, "unknown")
            .unwrap();

        assert_eq!(read.pairs, [(0, "tel".to_owned()), (1, "mail".to_owned())]);
        assert!(read.ok);
        assert!(!refused.ok);
        assert!(
            problems
                .identifier_table(&absent, "schema", "{}", parse, "unknown")
                .is_none()
        );
        let errors = problems.finish(|| ()).unwrap_err();
        let said: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            said,
            [
                "schema.EMAIL: expected the name of a member identifier, as a non-empty string",
                "schema.FAX: unknown",
            ]
        );
    }

    #[test]
    fn absent_keys_are_not_problems() {
        let mut problems = Problems::default();

        let value = problems.string(&table(""), Place::Connection, "format");

        assert_eq!(value, None);
        assert_eq!(problems.finish(|| 7), Ok(7));
    }
}
