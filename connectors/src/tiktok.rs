//! The `tiktok` connector: members of a TikTok Ads custom audience, Business API v1.3.
//!
//! This module owns the request (`POST {base_url}/segment/mapping/` with `action: "add"` or
//! `"delete"`, positional `batch_data` of SHA-256 digests under an `id_schema`), the preparation
//! of identifiers through [`crate::identifiers`] with TikTok's own e-mail rule, and the
//! classification of answers, which TikTok mostly sends as HTTP 200 with a non-zero `code` in
//! the body. It does not create audiences, check their size or status, or retry;
//! [`crate::deliver_with_retries`] retries.
//!
//! The body sent, as JSON (the access token travels in the `Access-Token` header):
//!
//! ```json
//! {"advertiser_ids": ["7001"], "action": "add", "id_schema": ["EMAIL_SHA256", "PHONE_SHA256"],
//!  "batch_data": [[{"id": "<sha256>", "audience_ids": ["123"]}, {}]]}
//! ```
//!
//! Each inner array is one member, one object per `id_schema` position, `{}` where the member
//! has no usable value. Adding an identifier the audience holds, or deleting one it does not,
//! changes nothing, so a batch delivered twice leaves the audience as delivering it once.
//!
//! What is not confirmed about this API is configurable rather than fixed here: the
//! per-request limit (`batch_size`, default 1000), the body codes that mean throttling
//! (`throttle_codes`) and rejected credentials (`auth_codes`), and whether a phone number is
//! hashed as E.164 with `+` or as digits only (`phone_format`). TikTok reports no per-member
//! result: a request it accepts accepts every member sent.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use serde_json::{Value, json};

use crate::http::{self, Secret, quote};
use crate::identifiers::{self, Invalid};
use crate::members;
use crate::settings::{self, Limit, Place, Problems};
use crate::{Batch, BoxFuture, Change, Connector, DeliveryError, Member, Outcome, SettingsError};

/// Connection keys the TikTok connector knows.
const CONNECTION_KEYS: &[&str] = &[
    "access_token_env",
    "advertiser_id",
    "base_url",
    "batch_size",
    "timeout_seconds",
    "throttle_codes",
    "auth_codes",
];
/// Activation keys the TikTok connector knows.
const ACTIVATION_KEYS: &[&str] = &["audience_id", "schema", "phone_format"];
/// The Business API root.
const DEFAULT_BASE_URL: &str = "https://business-api.tiktok.com/open_api/v1.3";
/// `batch_size`, members per request.
const BATCH_SIZE: Limit = Limit {
    default: 1000,
    max: 10_000,
};
/// `timeout_seconds`, seconds a request may take.
const TIMEOUT_SECONDS: Limit = Limit {
    default: 60,
    max: 600,
};
/// How much of an answer is read at most; TikTok's answers to this endpoint are small.
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// Body codes taken for throttling unless `throttle_codes` says otherwise: 40100 (requests
/// too frequent) and 42900 (too many requests), as third-party references report them.
const DEFAULT_THROTTLE_CODES: &[i64] = &[40100, 42900];
/// Body codes taken for rejected credentials unless `auth_codes` says otherwise: 40102
/// (expired), 40104 (missing) and 40105 (invalid or revoked access token).
const DEFAULT_AUTH_CODES: &[i64] = &[40102, 40104, 40105];
/// Body codes of TikTok's own failures, worth sending again.
const SYSTEM_ERROR_CODES: std::ops::RangeInclusive<i64> = 50_000..=59_999;
/// The header carrying the access token.
const ACCESS_TOKEN: HeaderName = HeaderName::from_static("access-token");
/// The schema used when an activation sets none: hashed e-mail from the `email` identifier.
const DEFAULT_SCHEMA: &[(IdType, &str)] = &[(IdType::Email, "email")];

/// An identifier type of TikTok's `id_schema`. Positions are always sent in the order
/// declared here, whatever order the activation's `schema` table lists them in, so that a
/// removal sends the same identifiers as the add it undoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum IdType {
    Email,
    Phone,
    Idfa,
    Aaid,
}

impl IdType {
    const ALL: [IdType; 4] = [IdType::Email, IdType::Phone, IdType::Idfa, IdType::Aaid];

    /// The type's name on the wire and in the `schema` setting.
    fn name(self) -> &'static str {
        match self {
            IdType::Email => "EMAIL_SHA256",
            IdType::Phone => "PHONE_SHA256",
            IdType::Idfa => "IDFA_SHA256",
            IdType::Aaid => "AAID_SHA256",
        }
    }

    fn parse(name: &str) -> Option<IdType> {
        IdType::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// The SHA-256 digest sent for `raw`; a value that already is a digest is sent as it is.
    fn prepare(self, raw: &str, phone_format: PhoneFormat) -> Result<String, Invalid> {
        use identifiers::hash_normalised as hash;
        match self {
            IdType::Email => hash(raw, email),
            IdType::Phone => match phone_format {
                PhoneFormat::E164 => hash(raw, identifiers::phone_e164),
                PhoneFormat::Digits => hash(raw, identifiers::phone_digits),
            },
            IdType::Idfa | IdType::Aaid => hash(raw, mobile_ad_id),
        }
    }
}

/// How a phone number is written before it is hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PhoneFormat {
    /// `+` and the digits, country code included: `+16505551212`.
    E164,
    /// The digits alone, country code included: `16505551212`.
    Digits,
}

/// An e-mail address as TikTok matches it: trimmed, lower-cased, and without a `+tag` before
/// the `@` (`Ann+news@Example.com` becomes `ann@example.com`). Dots are kept.
pub fn email(raw: &str) -> Result<String, Invalid> {
    let text = identifiers::email(raw)?;
    let (local, domain) = text.split_once('@').expect("a checked address has an @");
    let local = local.split('+').next().unwrap_or_default();
    if local.is_empty() {
        return Err(Invalid::Malformed {
            expected: "an e-mail address",
        });
    }
    Ok(format!("{local}@{domain}"))
}

/// A mobile advertising id, trimmed and lower-cased so that its case is always the same.
fn mobile_ad_id(raw: &str) -> Result<String, Invalid> {
    identifiers::clear(raw).map(|text| text.to_lowercase())
}

/// Adds and removes members of one TikTok custom audience.
///
/// Connection settings:
/// - `access_token_env` (required): the environment variable holding a Business API access
///   token with audience management permission; the engine passes its value as the
///   `access_token` secret.
/// - `advertiser_id` (required): the advertiser account owning the audiences, digits only.
/// - `base_url`: the API root, default `https://business-api.tiktok.com/open_api/v1.3`.
/// - `batch_size`: members per request, 1 to 10000, default 1000.
/// - `timeout_seconds`: per request, 1 to 600, default 60.
/// - `throttle_codes`: body codes meaning throttling, default `[40100, 42900]`.
/// - `auth_codes`: body codes meaning rejected credentials, default `[40102, 40104, 40105]`.
///
/// Activation settings:
/// - `audience_id` (required): the custom audience's id, digits only, as a string or an
///   integer.
/// - `schema`: a table from TikTok identifier types (`EMAIL_SHA256`, `PHONE_SHA256`,
///   `IDFA_SHA256`, `AAID_SHA256`) to the member identifier each is read from, default
///   `{ EMAIL_SHA256 = "email" }`.
/// - `phone_format`: `e164` (default) or `digits`, how phones are written before hashing.
#[derive(Debug, Clone)]
pub struct TiktokConnector {
    /// The HTTP client, with the connection's timeout.
    client: reqwest::Client,
    /// `{base_url}/segment/mapping/`.
    mapping_url: Url,
    /// The access token, sent in the `Access-Token` header.
    access_token: Secret,
    /// `advertiser_id`.
    advertiser_id: String,
    /// `audience_id`.
    audience_id: String,
    /// Identifier types in wire order, each with the member identifier it is read from.
    schema: Vec<(IdType, String)>,
    /// `phone_format`.
    phone_format: PhoneFormat,
    /// Body codes meaning throttling.
    throttle_codes: BTreeSet<i64>,
    /// Body codes meaning rejected credentials.
    auth_codes: BTreeSet<i64>,
    /// Members per request (`batch_size`).
    batch_size: usize,
}

/// One member ready to send: its profile key and its digests in schema order, `None` where it
/// has no usable value.
type Row<'a> = (&'a str, Vec<Option<String>>);

/// The connection's settings, checked.
struct ConnectionSettings {
    /// The HTTP client, with `timeout_seconds` applied.
    client: reqwest::Client,
    /// `base_url`, or the Business API root.
    base_url: Url,
    /// The value of the variable `access_token_env` names.
    access_token: Secret,
    /// `advertiser_id`.
    advertiser_id: String,
    /// `throttle_codes`.
    throttle_codes: BTreeSet<i64>,
    /// `auth_codes`.
    auth_codes: BTreeSet<i64>,
    /// `batch_size`.
    batch_size: usize,
}

/// The activation's settings, checked.
struct ActivationSettings {
    /// `audience_id`, digits only.
    audience_id: String,
    /// `schema`, in wire order.
    schema: Vec<(IdType, String)>,
    /// `phone_format`.
    phone_format: PhoneFormat,
}

impl TiktokConnector {
    /// Builds the connector from its connection and activation settings and the resolved
    /// secrets (`access_token`), returning every problem found.
    pub fn from_settings(
        connection: &toml::Table,
        activation: &toml::Table,
        secrets: &BTreeMap<String, String>,
    ) -> Result<Self, Vec<SettingsError>> {
        settings::build(
            connection,
            activation,
            secrets,
            read_connection,
            read_activation,
            Self::new,
        )
    }

    /// Checks the connection settings alone, as when a connection is loaded before any
    /// activation uses it; returns every problem found.
    pub fn check_connection(
        connection: &toml::Table,
        secrets: &BTreeMap<String, String>,
    ) -> Result<(), Vec<SettingsError>> {
        settings::check(connection, secrets, read_connection)
    }

    fn new(connection: ConnectionSettings, activation: ActivationSettings) -> Self {
        // The trailing empty segment gives the trailing `/` TikTok's paths have.
        let mapping_url = http::endpoint(&connection.base_url, &["segment", "mapping", ""]);
        TiktokConnector {
            client: connection.client,
            mapping_url,
            access_token: connection.access_token,
            advertiser_id: connection.advertiser_id,
            audience_id: activation.audience_id,
            schema: activation.schema,
            phone_format: activation.phone_format,
            throttle_codes: connection.throttle_codes,
            auth_codes: connection.auth_codes,
            batch_size: connection.batch_size,
        }
    }

    /// Sends one batch once and classifies the answer.
    async fn send(&self, batch: &Batch) -> Result<Outcome, DeliveryError> {
        let (rows, mut outcome) = self.prepare(batch);
        if rows.is_empty() {
            return Ok(outcome);
        }
        let action = match batch.change {
            Change::Add => "add",
            Change::Remove => "delete",
            Change::Replace => return Err(crate::cannot_replace(self.kind())),
        };

        let batch_data: Vec<Vec<Value>> = rows
            .iter()
            .map(|(_, row)| {
                row.iter()
                    .map(|digest| match digest {
                        Some(id) => json!({"id": id, "audience_ids": [self.audience_id]}),
                        None => json!({}),
                    })
                    .collect()
            })
            .collect();
        let body = json!({
            "advertiser_ids": [self.advertiser_id],
            "action": action,
            "id_schema": self.schema.iter().map(|(kind, _)| kind.name()).collect::<Vec<_>>(),
            "batch_data": batch_data,
        });
        let token =
            HeaderValue::from_str(self.access_token.expose()).map_err(|_| DeliveryError::Auth {
                message: "the access token holds characters an HTTP header cannot carry; check \
                          `access_token_env`"
                    .to_owned(),
            })?;
        let response = self
            .client
            .post(self.mapping_url.clone())
            .header(ACCESS_TOKEN, sensitive(token))
            .json(&body)
            .send()
            .await
            .map_err(|error| http::transport_failure("POST", self.mapping_url.as_str(), error))?;

        let status = response.status();
        let headers = response.headers().clone();
        let body = http::body_start(response, MAX_ANSWER_BYTES).await;
        self.classify(status, &headers, &body, SystemTime::now())?;
        outcome
            .accepted
            .extend(rows.iter().map(|(key, _)| key.to_string()));
        Ok(outcome)
    }

    /// The row of each member that has at least one usable identifier, with its key, and an
    /// outcome holding a rejection for every member that has none.
    fn prepare<'a>(&self, batch: &'a Batch) -> (Vec<Row<'a>>, Outcome) {
        members::prepare(batch, "tiktok", "identifier", |member| {
            Ok((member.key.as_str(), self.row(member)?))
        })
    }

    /// One member's digests in schema order, `None` for each identifier that is missing or
    /// invalid; the reasons when none is usable.
    fn row(&self, member: &Member) -> Result<Vec<Option<String>>, String> {
        let mut row = Vec::with_capacity(self.schema.len());
        let mut reasons = Vec::new();
        for (kind, identifier) in &self.schema {
            let prepared = match member.identifiers.get(identifier) {
                Some(raw) => kind.prepare(raw, self.phone_format),
                None => Err(Invalid::Missing),
            };
            match prepared {
                Ok(digest) => row.push(Some(digest)),
                Err(invalid) => {
                    reasons.push(format!("{} (`{identifier}`) {invalid}", kind.name()));
                    row.push(None);
                }
            }
        }
        if row.iter().all(Option::is_none) {
            Err(format!("no usable identifier: {}", reasons.join("; ")))
        } else {
            Ok(row)
        }
    }

    /// `Ok` when the answer accepts the request, the failure it stands for otherwise.
    fn classify(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<(), DeliveryError> {
        let shown = self.mapping_url.as_str();
        let envelope = serde_json::from_slice::<Envelope>(body)
            .ok()
            .filter(|envelope| envelope.code.is_some());
        match envelope {
            Some(envelope) if envelope.code == Some(0) && status.is_success() => Ok(()),
            Some(envelope) => Err(self.classify_code(status, headers, &envelope, shown, now)),
            None => Err(classify_bare(status, headers, body, shown, now)),
        }
    }

    /// The failure a body with a non-zero `code` stands for.
    fn classify_code(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        envelope: &Envelope,
        shown: &str,
        now: SystemTime,
    ) -> DeliveryError {
        let code = envelope.code.unwrap_or_default();
        let message = format!("{shown} answered {status}: {}", envelope.describe());
        if self.throttle_codes.contains(&code) || status == StatusCode::TOO_MANY_REQUESTS {
            return DeliveryError::RateLimited {
                wait: http::retry_after(headers, now),
                message,
            };
        }
        if self.auth_codes.contains(&code) || status == StatusCode::UNAUTHORIZED {
            return DeliveryError::Auth {
                message: format!("{message}; renew the access token in `access_token_env`"),
            };
        }
        if SYSTEM_ERROR_CODES.contains(&code)
            || (status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED)
        {
            return DeliveryError::Retryable { message };
        }
        DeliveryError::Permanent { message }
    }
}

impl Connector for TiktokConnector {
    fn destination(&self) -> Option<String> {
        Some(format!("TikTok audience {}", self.audience_id))
    }

    fn kind(&self) -> &'static str {
        "tiktok"
    }

    fn max_batch_size(&self) -> usize {
        self.batch_size
    }

    fn deliver<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<Outcome, DeliveryError>> {
        Box::pin(self.send(batch))
    }
}

/// `value`, marked sensitive so that it never shows in `Debug` output.
fn sensitive(mut value: HeaderValue) -> HeaderValue {
    value.set_sensitive(true);
    value
}

/// TikTok's answer envelope.
#[derive(serde::Deserialize)]
struct Envelope {
    /// `0` on success, otherwise what went wrong.
    #[serde(default)]
    code: Option<i64>,
    /// What TikTok says.
    #[serde(default)]
    message: String,
    /// TikTok's id of the request, for support.
    #[serde(default)]
    request_id: Option<String>,
}

impl Envelope {
    /// `Too many requests (code 40100, request_id 2026...)`.
    fn describe(&self) -> String {
        let mut details = vec![format!("code {}", self.code.unwrap_or_default())];
        if let Some(id) = &self.request_id {
            details.push(format!("request_id {id}"));
        }
        format!("{} ({})", quote(&self.message), details.join(", "))
    }
}

/// The failure an answer without a TikTok envelope stands for (an HTML error page, a proxy's
/// answer, an empty body).
fn classify_bare(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    shown: &str,
    now: SystemTime,
) -> DeliveryError {
    let text = String::from_utf8_lossy(body);
    let message = if text.trim_start().starts_with('<') {
        format!("{shown} answered {status} with an HTML page instead of a TikTok answer")
    } else {
        format!("{shown} answered {status}: {}", quote(&text))
    };
    match status.as_u16() {
        429 => DeliveryError::RateLimited {
            wait: http::retry_after(headers, now),
            message,
        },
        401 => DeliveryError::Auth { message },
        413 => DeliveryError::Permanent {
            message: format!("{message}; the request is too large, lower `batch_size`"),
        },
        // A success status without a readable envelope is a broken answer, not a verdict.
        200..=299 | 408 | 500 | 502..=599 => DeliveryError::Retryable { message },
        _ => DeliveryError::Permanent { message },
    }
}

/// The checked connection settings, `None` when any is wrong (the problems say which).
fn read_connection(
    problems: &mut Problems,
    table: &toml::Table,
    secrets: &BTreeMap<String, String>,
) -> Option<ConnectionSettings> {
    problems.reject_unknown_keys(table, Place::Connection, CONNECTION_KEYS);
    let access_token = problems.secret(
        table,
        secrets,
        "access_token",
        "a TikTok Business API access token",
    );
    let advertiser_id = read_digits(
        problems,
        table,
        Place::Connection,
        "advertiser_id",
        "the advertiser account's id",
    );
    let base_url = problems.base_url(table, DEFAULT_BASE_URL);
    let batch_size = problems.batch_size(table, BATCH_SIZE);
    let client = problems.http_client(table, "base_url", TIMEOUT_SECONDS);
    let throttle_codes = read_codes(problems, table, "throttle_codes", DEFAULT_THROTTLE_CODES);
    let auth_codes = read_codes(problems, table, "auth_codes", DEFAULT_AUTH_CODES);

    Some(ConnectionSettings {
        client: client?,
        base_url: base_url?,
        access_token: Secret(access_token?),
        advertiser_id: advertiser_id?,
        throttle_codes: throttle_codes?,
        auth_codes: auth_codes?,
        batch_size,
    })
}

/// A required id of digits only at `key`, given as a string or a positive integer.
fn read_digits(
    problems: &mut Problems,
    table: &toml::Table,
    place: Place,
    key: &str,
    what: &str,
) -> Option<String> {
    let missing = format!("missing; set it to {what}");
    let wrong = format!("expected {what}, digits only, in the {}", place.describe());
    problems.numeric_id(table, key, &missing, &wrong)
}

/// A list of body codes at `key` of the connection settings, or `default`.
fn read_codes(
    problems: &mut Problems,
    table: &toml::Table,
    key: &str,
    default: &[i64],
) -> Option<BTreeSet<i64>> {
    let Some(value) = table.get(key) else {
        return Some(default.iter().copied().collect());
    };
    let codes: Option<BTreeSet<i64>> = value
        .as_array()
        .and_then(|codes| codes.iter().map(toml::Value::as_integer).collect());
    if codes.is_none() {
        problems.push(
            key,
            format!(
                "expected a list of integer codes such as {default:?}, found {}",
                value.type_str()
            ),
        );
    }
    codes
}

/// The checked activation settings, `None` when any is wrong (the problems say which).
fn read_activation(problems: &mut Problems, table: &toml::Table) -> Option<ActivationSettings> {
    problems.reject_unknown_keys(table, Place::Activation, ACTIVATION_KEYS);
    let audience_id = read_digits(
        problems,
        table,
        Place::Activation,
        "audience_id",
        "the custom audience's id",
    );
    let schema = read_schema(problems, table);
    let phone_format = match problems
        .string(table, Place::Activation, "phone_format")
        .as_deref()
    {
        None | Some("e164") => Some(PhoneFormat::E164),
        Some("digits") => Some(PhoneFormat::Digits),
        Some(other) => {
            problems.push(
                "phone_format",
                format!("expected `e164` or `digits`, got `{other}`"),
            );
            None
        }
    };
    Some(ActivationSettings {
        audience_id: audience_id?,
        schema: schema?,
        phone_format: phone_format?,
    })
}

/// `schema`, a table from TikTok identifier types to member identifiers, in wire order.
fn read_schema(problems: &mut Problems, table: &toml::Table) -> Option<Vec<(IdType, String)>> {
    let known: Vec<&str> = IdType::ALL.iter().map(|kind| kind.name()).collect();
    let unknown = format!(
        "unknown TikTok identifier type; known types: {}",
        known.join(", ")
    );
    let example = "{ EMAIL_SHA256 = \"email\" }";
    let Some(schema) = problems.identifier_table(table, "schema", example, IdType::parse, &unknown)
    else {
        return Some(
            DEFAULT_SCHEMA
                .iter()
                .map(|(kind, identifier)| (*kind, identifier.to_string()))
                .collect(),
        );
    };
    schema.finish(
        problems,
        "schema",
        "empty; map at least one TikTok identifier type to an identifier",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connector(connection: toml::Table) -> TiktokConnector {
        let activation = toml::toml! { audience_id = "123" };
        let secrets = BTreeMap::from([("access_token".to_owned(), "tok-secret-1".to_owned())]);
        TiktokConnector::from_settings(&connection, &activation, &secrets).unwrap()
    }

    fn kind(result: Result<(), DeliveryError>) -> &'static str {
        match result {
            Ok(()) => "accepted",
            Err(DeliveryError::Retryable { .. }) => "retryable",
            Err(DeliveryError::RateLimited { .. }) => "rate limited",
            Err(DeliveryError::Auth { .. }) => "auth",
            Err(DeliveryError::Permanent { .. }) => "permanent",
        }
    }

    #[test]
    fn body_codes_are_classified_by_what_sending_again_would_do() {
        let tiktok = connector(toml::toml! {
            access_token_env = "TIKTOK_TOKEN"
            advertiser_id = "7001"
        });
        let classify = |status: u16, body: &str| {
            let status = StatusCode::from_u16(status).unwrap();
            let answer = tiktok.classify(
                status,
                &HeaderMap::new(),
                body.as_bytes(),
                SystemTime::now(),
            );
            kind(answer)
        };

        assert_eq!(classify(200, r#"{"code": 0, "message": "OK"}"#), "accepted");
        assert_eq!(
            classify(200, r#"{"code": 40100, "message": "x"}"#),
            "rate limited"
        );
        assert_eq!(
            classify(200, r#"{"code": 42900, "message": "x"}"#),
            "rate limited"
        );
        assert_eq!(classify(200, r#"{"code": 40105, "message": "x"}"#), "auth");
        assert_eq!(classify(200, r#"{"code": 40102, "message": "x"}"#), "auth");
        assert_eq!(
            classify(200, r#"{"code": 50000, "message": "x"}"#),
            "retryable"
        );
        assert_eq!(
            classify(200, r#"{"code": 40002, "message": "x"}"#),
            "permanent"
        );
        assert_eq!(classify(200, "<html>oops</html>"), "retryable");
        assert_eq!(classify(503, "<html>busy</html>"), "retryable");
        assert_eq!(classify(404, "<html>no</html>"), "permanent");
        assert_eq!(classify(429, ""), "rate limited");
        assert_eq!(classify(401, r#"{"code": 40001, "message": "x"}"#), "auth");
    }

    #[test]
    fn configured_codes_replace_the_defaults() {
        let tiktok = connector(toml::toml! {
            access_token_env = "TIKTOK_TOKEN"
            advertiser_id = 7001
            throttle_codes = [51001]
            auth_codes = [40002]
        });
        let classify = |body: &str| {
            let answer = tiktok.classify(
                StatusCode::OK,
                &HeaderMap::new(),
                body.as_bytes(),
                SystemTime::now(),
            );
            kind(answer)
        };

        assert_eq!(
            classify(r#"{"code": 51001, "message": "x"}"#),
            "rate limited"
        );
        assert_eq!(classify(r#"{"code": 40002, "message": "x"}"#), "auth");
        assert_eq!(classify(r#"{"code": 40105, "message": "x"}"#), "permanent");
        assert_eq!(classify(r#"{"code": 40100, "message": "x"}"#), "permanent");
    }

    #[test]
    fn emails_lose_a_plus_tag_but_keep_their_dots() {
        assert_eq!(
            email(" Ann.Lee+News@Example.com "),
            Ok("ann.lee@example.com".into())
        );
        assert_eq!(email("bob@example.com"), Ok("bob@example.com".into()));
        assert_eq!(
            email("+tag@example.com"),
            Err(Invalid::Malformed {
                expected: "an e-mail address"
            })
        );
    }

    #[test]
    fn identifier_types_follow_the_wire_order_whatever_the_table_order() {
        let mut problems = Problems::default();
        let table = toml::toml! {
            schema = { AAID_SHA256 = "aaid", PHONE_SHA256 = "phone", EMAIL_SHA256 = "email" }
        };

        let schema = read_schema(&mut problems, &table).unwrap();

        let names: Vec<&str> = schema.iter().map(|(kind, _)| kind.name()).collect();
        assert_eq!(names, ["EMAIL_SHA256", "PHONE_SHA256", "AAID_SHA256"]);
    }

    #[test]
    fn the_mapping_url_keeps_its_trailing_slash() {
        let tiktok = connector(toml::toml! {
            access_token_env = "TIKTOK_TOKEN"
            advertiser_id = "7001"
        });

        assert_eq!(
            tiktok.mapping_url.as_str(),
            "https://business-api.tiktok.com/open_api/v1.3/segment/mapping/"
        );
        assert!(!format!("{tiktok:?}").contains("tok-secret-1"));
    }
}
