//! Reading connector settings out of TOML tables.
//!
//! Connections and activations hand their settings to a connector as plain TOML tables. This
//! module owns the checks every connector repeats on them: unknown keys, value types and
//! integer ranges, each reported as a [`SettingsError`] naming the key, and all of them
//! collected rather than stopping at the first. What a value means is up to the connector.

use std::ops::RangeInclusive;

use crate::SettingsError;

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
        secrets: &std::collections::BTreeMap<String, String>,
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
    fn absent_keys_are_not_problems() {
        let mut problems = Problems::default();

        let value = problems.string(&table(""), Place::Connection, "format");

        assert_eq!(value, None);
        assert_eq!(problems.finish(|| 7), Ok(7));
    }
}
