//! Column types an operator declares for sources and master segment tables.
//!
//! Types are declared, never guessed from data, so a stray value cannot change a column's type
//! between runs. This module owns the small grammar of type names accepted in pipeline files
//! and their SQL spelling; it does not touch DuckDB.

use std::fmt;

/// A declared column type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnType {
    /// `BOOLEAN`.
    Boolean,
    /// A whole number: `TINYINT`, `SMALLINT`, `INTEGER`, `BIGINT` or `HUGEINT`.
    Integer(&'static str),
    /// `FLOAT` or `DOUBLE`.
    Float(&'static str),
    /// `DECIMAL(precision, scale)`.
    Decimal(u8, u8),
    /// `VARCHAR`.
    Text,
    /// `DATE`.
    Date,
    /// `TIMESTAMP`: a wall-clock time in the master segment's time zone.
    Timestamp,
    /// A list of values of the inner type, written `VARCHAR[]`.
    List(Box<ColumnType>),
}

/// What kind of values a column holds, for checking rule values against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// Booleans.
    Boolean,
    /// Numbers of any width.
    Number,
    /// Text.
    Text,
    /// Dates and timestamps.
    Time,
    /// Lists.
    List,
}

impl ColumnType {
    /// Parses a declared type such as `BIGINT`, `decimal(10,2)` or `VARCHAR[]`.
    pub fn parse(text: &str) -> Result<ColumnType, String> {
        let upper = text.trim().to_ascii_uppercase();
        if let Some(inner) = upper.strip_suffix("[]") {
            let inner = ColumnType::parse(inner)?;
            if matches!(inner, ColumnType::List(_)) {
                return Err(format!("`{text}`: lists of lists are not supported"));
            }
            return Ok(ColumnType::List(Box::new(inner)));
        }
        let simple = match upper.as_str() {
            "BOOLEAN" | "BOOL" => Some(ColumnType::Boolean),
            "TINYINT" => Some(ColumnType::Integer("TINYINT")),
            "SMALLINT" => Some(ColumnType::Integer("SMALLINT")),
            "INTEGER" | "INT" => Some(ColumnType::Integer("INTEGER")),
            "BIGINT" => Some(ColumnType::Integer("BIGINT")),
            "HUGEINT" => Some(ColumnType::Integer("HUGEINT")),
            "FLOAT" | "REAL" => Some(ColumnType::Float("FLOAT")),
            "DOUBLE" => Some(ColumnType::Float("DOUBLE")),
            "VARCHAR" | "TEXT" | "STRING" => Some(ColumnType::Text),
            "DATE" => Some(ColumnType::Date),
            "TIMESTAMP" => Some(ColumnType::Timestamp),
            _ => None,
        };
        if let Some(simple) = simple {
            return Ok(simple);
        }
        if let Some(args) = upper
            .strip_prefix("DECIMAL(")
            .and_then(|r| r.strip_suffix(')'))
        {
            let parts: Vec<&str> = args.split(',').map(str::trim).collect();
            if let [precision, scale] = parts.as_slice()
                && let (Ok(precision), Ok(scale)) = (precision.parse::<u8>(), scale.parse::<u8>())
                && (1..=38).contains(&precision)
                && scale <= precision
            {
                return Ok(ColumnType::Decimal(precision, scale));
            }
        }
        Err(format!(
            "unknown column type `{text}`; use BOOLEAN, TINYINT, SMALLINT, INTEGER, BIGINT, \
             HUGEINT, FLOAT, DOUBLE, DECIMAL(p,s), VARCHAR, DATE, TIMESTAMP, or one of these \
             followed by [] for a list"
        ))
    }

    /// The kind of values the column holds.
    pub fn kind(&self) -> ValueKind {
        match self {
            ColumnType::Boolean => ValueKind::Boolean,
            ColumnType::Integer(_) | ColumnType::Float(_) | ColumnType::Decimal(..) => {
                ValueKind::Number
            }
            ColumnType::Text => ValueKind::Text,
            ColumnType::Date | ColumnType::Timestamp => ValueKind::Time,
            ColumnType::List(_) => ValueKind::List,
        }
    }
}

impl fmt::Display for ColumnType {
    /// The SQL spelling, safe to place in a statement.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnType::Boolean => f.write_str("BOOLEAN"),
            ColumnType::Integer(name) | ColumnType::Float(name) => f.write_str(name),
            ColumnType::Decimal(precision, scale) => write!(f, "DECIMAL({precision},{scale})"),
            ColumnType::Text => f.write_str("VARCHAR"),
            ColumnType::Date => f.write_str("DATE"),
            ColumnType::Timestamp => f.write_str("TIMESTAMP"),
            ColumnType::List(inner) => write!(f, "{inner}[]"),
        }
    }
}

/// Quotes an identifier for SQL: wraps it in double quotes, doubling any inside.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a text literal for SQL: wraps it in single quotes, doubling any inside. Used only for
/// values that come from the operator's pipeline file (paths, delimiters), never rule values.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The JSON path of the object key `name`, as an SQL string literal (`'$."email"'`).
pub fn json_key_path(name: &str) -> String {
    quote_literal(&format!("$.\"{}\"", name.replace('"', "\\\"")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_declared_types_case_insensitively() {
        assert_eq!(
            ColumnType::parse("bigint").unwrap(),
            ColumnType::Integer("BIGINT")
        );
        assert_eq!(
            ColumnType::parse("Decimal(10, 2)").unwrap(),
            ColumnType::Decimal(10, 2)
        );
        assert_eq!(
            ColumnType::parse("varchar[]").unwrap(),
            ColumnType::List(Box::new(ColumnType::Text))
        );
        assert_eq!(
            ColumnType::parse("DECIMAL(10,2)").unwrap().to_string(),
            "DECIMAL(10,2)"
        );
    }

    #[test]
    fn rejects_unknown_and_unsafe_types() {
        assert!(ColumnType::parse("BIGINT); DROP TABLE x; --").is_err());
        assert!(ColumnType::parse("DECIMAL(3,5)").is_err());
        assert!(ColumnType::parse("VARCHAR[][]").is_err());
    }

    #[test]
    fn quoting_doubles_embedded_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
