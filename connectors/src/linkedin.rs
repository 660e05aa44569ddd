//! The `linkedin` connector: members of a LinkedIn Matched Audiences DMP segment.
//!
//! This module owns the request (`POST {base_url}/rest/dmpSegments/{segment_id}/users`, or
//! `/companies` for a company segment, as a Rest.li `BATCH_CREATE` whose elements each carry
//! `action: ADD` or `action: REMOVE`), the preparation of elements from members' identifiers,
//! the reading of the per-element statuses of the answer, and the classification of failures.
//! It does not create segments, wait out the few seconds a new segment needs before it takes
//! members, obtain or refresh access tokens, or retry; [`crate::deliver_with_retries`]
//! retries.
//!
//! Every request carries `Authorization: Bearer`, `LinkedIn-Version` (the `linkedin_version`
//! setting, to be moved forward before LinkedIn retires the version, about a year after its
//! release), `X-Restli-Protocol-Version: 2.0.0` and `X-RestLi-Method: BATCH_CREATE`.
//!
//! LinkedIn answers adding a member already in the segment, and removing one that is not,
//! with 201 like any other success, so a batch sent again (after a timeout, or twice) leaves
//! the segment as sending it once: the connector relies on that and keeps no session.
//!
//! User segments: e-mail addresses are trimmed, lower-cased and SHA-256 hashed
//! (`SHA256_EMAIL`); a value that already is a SHA-256 digest is sent as it is, lower-cased,
//! and one that is a SHA-512 digest goes as `SHA512_EMAIL`. A Google advertising id goes in
//! clear (`GOOGLE_AID`). First name, last name, title and company, when mapped, go in clear
//! beside the ids, as LinkedIn specifies; they never identify a member on their own. Company
//! segments: a website domain (scheme, `www.` and path removed, lower-cased) and an
//! organization URN, in clear.

use std::collections::BTreeMap;
use std::time::SystemTime;

use reqwest::header::HeaderMap;
use reqwest::{StatusCode, Url};
use serde_json::{Map, Value, json};

use crate::http::{self, Secret, quote};
use crate::identifiers::{self, Invalid};
use crate::members;
use crate::settings::{self, HeaderSecret, Limit, Place, Problems};
use crate::{
    Batch, BoxFuture, Change, Connector, DeliveryError, Member, Outcome, Rejection, SettingsError,
};

/// Connection keys the LinkedIn connector knows.
const CONNECTION_KEYS: &[&str] = &[
    "access_token_env",
    "base_url",
    "linkedin_version",
    "batch_size",
    "timeout_seconds",
];
/// Activation keys the LinkedIn connector knows.
const ACTIVATION_KEYS: &[&str] = &["segment_id", "segment_type", "identifiers"];
/// The LinkedIn API host.
const DEFAULT_BASE_URL: &str = "https://api.linkedin.com";
/// The `LinkedIn-Version` sent unless `linkedin_version` says otherwise.
const DEFAULT_LINKEDIN_VERSION: &str = "202610";
/// The Rest.li protocol version LinkedIn's versioned API requires.
const RESTLI_PROTOCOL_VERSION: &str = "2.0.0";
/// `batch_size`, members per request. LinkedIn documents no ceiling for a batch; the default
/// is a size integrations commonly use.
const BATCH_SIZE: Limit = Limit {
    default: 1_000,
    max: 5_000,
};
/// `timeout_seconds`, seconds a request may take.
const TIMEOUT_SECONDS: Limit = Limit {
    default: 60,
    max: 600,
};
/// How much of an answer is read at most; per-element statuses of 5000 elements fit.
const MAX_ANSWER_BYTES: usize = 8 << 20;

/// Whether the segment holds people or companies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SegmentType {
    /// People, matched on hashed e-mail addresses and advertising ids (`/users`).
    User,
    /// Companies, matched on website domains and organization URNs (`/companies`).
    Company,
}

impl SegmentType {
    fn path(self) -> &'static str {
        match self {
            SegmentType::User => "users",
            SegmentType::Company => "companies",
        }
    }

    fn fields(self) -> &'static [Field] {
        match self {
            SegmentType::User => &[
                Field::Email,
                Field::GoogleAid,
                Field::FirstName,
                Field::LastName,
                Field::Title,
                Field::Company,
            ],
            SegmentType::Company => &[
                Field::WebsiteDomain,
                Field::Organization,
                Field::CompanyName,
            ],
        }
    }
}

/// A value an element carries, as named in the `identifiers` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Field {
    /// `userIds[] { idType: SHA256_EMAIL | SHA512_EMAIL }`.
    Email,
    /// `userIds[] { idType: GOOGLE_AID }`, in clear.
    GoogleAid,
    /// `firstName`, in clear.
    FirstName,
    /// `lastName`, in clear.
    LastName,
    /// `title`, in clear.
    Title,
    /// `company`, in clear.
    Company,
    /// `companyWebsiteDomain`.
    WebsiteDomain,
    /// `organizationUrn`.
    Organization,
    /// `companyName`, in clear.
    CompanyName,
}

impl Field {
    /// The field's name in the `identifiers` setting and in rejection reasons.
    fn name(self) -> &'static str {
        match self {
            Field::Email => "email",
            Field::GoogleAid => "google_aid",
            Field::FirstName => "first_name",
            Field::LastName => "last_name",
            Field::Title => "title",
            Field::Company => "company",
            Field::WebsiteDomain => "website_domain",
            Field::Organization => "organization",
            Field::CompanyName => "company_name",
        }
    }

    /// True for the fields that identify a member; the others only accompany them.
    fn identifies(self) -> bool {
        matches!(
            self,
            Field::Email | Field::GoogleAid | Field::WebsiteDomain | Field::Organization
        )
    }
}

/// An e-mail id: its `idType` and `idValue`.
fn email_id(raw: &str) -> Result<(&'static str, String), Invalid> {
    let trimmed = raw.trim();
    if trimmed.len() == 128 && trimmed.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(("SHA512_EMAIL", trimmed.to_ascii_lowercase()));
    }
    identifiers::hash_normalised(raw, identifiers::email).map(|hash| ("SHA256_EMAIL", hash))
}

/// A website domain: lower-cased, without scheme, `www.`, port or path
/// (`https://www.Example.com/about` becomes `example.com`).
fn website_domain(raw: &str) -> Result<String, Invalid> {
    let text = raw.trim().to_ascii_lowercase();
    let text = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .unwrap_or(&text);
    let host = text.split(['/', '?', '#', ':']).next().unwrap_or_default();
    let host = host.strip_prefix("www.").unwrap_or(host);
    if host.is_empty() {
        return Err(Invalid::Empty);
    }
    let shaped = host.contains('.')
        && !host.starts_with('.')
        && !host.ends_with('.')
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if shaped {
        Ok(host.to_owned())
    } else {
        Err(Invalid::Malformed {
            expected: "a website domain such as `example.com`",
        })
    }
}

/// An organization URN, `urn:li:organization:<id>`, from the URN or the bare id.
fn organization_urn(raw: &str) -> Result<String, Invalid> {
    let text = raw.trim();
    if text.is_empty() {
        return Err(Invalid::Empty);
    }
    let id = text.strip_prefix("urn:li:organization:").unwrap_or(text);
    if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) {
        Ok(format!("urn:li:organization:{id}"))
    } else {
        Err(Invalid::Malformed {
            expected: "an organization URN such as `urn:li:organization:1337` or its id",
        })
    }
}

/// Adds and removes members of one LinkedIn DMP segment.
///
/// Connection settings:
/// - `access_token_env` (required): the environment variable holding an OAuth access token
///   with the `rw_dmp_segments` scope, of a member with a non-viewer role on the ad account;
///   the engine passes its value as the `access_token` secret. LinkedIn access tokens expire
///   (about 60 days); renewing them is the operator's.
/// - `base_url`: the API host, default `https://api.linkedin.com`.
/// - `linkedin_version`: the `LinkedIn-Version` header, `YYYYMM`, default `202610`.
/// - `batch_size`: elements per request, 1 to 5000, default 1000.
/// - `timeout_seconds`: per request, 1 to 600, default 60.
///
/// Activation settings:
/// - `segment_id` (required): the DMP segment's numeric id.
/// - `segment_type`: `user` (default) or `company`, as the segment was created.
/// - `identifiers`: a table from element fields to the member identifier each is read from.
///   User segments take `email`, `google_aid`, `first_name`, `last_name`, `title`, `company`,
///   default `{ email = "email" }`; company segments take `website_domain`, `organization`,
///   `company_name`, default `{ website_domain = "website" }`.
#[derive(Debug, Clone)]
pub struct LinkedInConnector {
    /// The HTTP client, with the connection's timeout.
    client: reqwest::Client,
    /// `{base_url}/rest/dmpSegments/{segment_id}/users` (or `/companies`).
    url: Url,
    /// The access token, sent as the bearer token.
    access_token: Secret,
    /// The `LinkedIn-Version` header.
    linkedin_version: String,
    /// `segment_type`.
    segment_type: SegmentType,
    /// Fields in wire order, each with the member identifier it is read from.
    fields: Vec<(Field, String)>,
    /// Elements per request (`batch_size`).
    batch_size: usize,
}

/// The connection's settings, checked.
struct ConnectionSettings {
    /// The HTTP client, with `timeout_seconds` applied.
    client: reqwest::Client,
    /// `base_url`, or the API host.
    base_url: Url,
    /// The value of the variable `access_token_env` names.
    access_token: Secret,
    /// `linkedin_version`.
    linkedin_version: String,
    /// `batch_size`.
    batch_size: usize,
}

/// The activation's settings, checked.
struct ActivationSettings {
    /// `segment_id`, digits only.
    segment_id: String,
    /// `segment_type`.
    segment_type: SegmentType,
    /// `identifiers`, in wire order.
    fields: Vec<(Field, String)>,
}

/// One member ready to send.
struct Prepared<'a> {
    /// The member's profile key.
    key: &'a str,
    /// The element's fields other than `action`.
    element: Map<String, Value>,
}

/// What LinkedIn said about one element it processed; an element answered 429 or 5xx was
/// not processed, and stands as that status instead.
enum ElementStatus {
    /// 2xx: added or removed (or already so).
    Done,
    /// 4xx: refused, for this reason.
    Refused(String),
}

impl LinkedInConnector {
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
        let path = [
            "rest",
            "dmpSegments",
            activation.segment_id.as_str(),
            activation.segment_type.path(),
        ];
        let url = http::endpoint(&connection.base_url, &path);
        LinkedInConnector {
            client: connection.client,
            url,
            access_token: connection.access_token,
            linkedin_version: connection.linkedin_version,
            segment_type: activation.segment_type,
            fields: activation.fields,
            batch_size: connection.batch_size,
        }
    }

    /// Sends one batch once and reads the status of every element.
    async fn send(&self, batch: &Batch) -> Result<Outcome, DeliveryError> {
        let (members, mut outcome) = self.prepare(batch);
        if members.is_empty() {
            return Ok(outcome);
        }
        let action = match batch.change {
            Change::Add => "ADD",
            Change::Remove => "REMOVE",
            Change::Replace => return Err(crate::cannot_replace(self.kind())),
        };
        let elements: Vec<Value> = members
            .iter()
            .map(|member| {
                let mut element = member.element.clone();
                element.insert("action".into(), json!(action));
                Value::Object(element)
            })
            .collect();
        let response = self
            .client
            .post(self.url.clone())
            .bearer_auth(self.access_token.expose())
            .header("LinkedIn-Version", &self.linkedin_version)
            .header("X-Restli-Protocol-Version", RESTLI_PROTOCOL_VERSION)
            .header("X-RestLi-Method", "BATCH_CREATE")
            .json(&json!({ "elements": elements }))
            .send()
            .await
            .map_err(|error| http::transport_failure("POST", self.url.as_str(), error))?;

        let status = response.status();
        let headers = response.headers().clone();
        let body = http::body_start(response, MAX_ANSWER_BYTES).await;
        let shown = self.url.as_str();
        // Names, titles and companies are sent in clear and can come back in messages.
        let known = http::identifier_values(batch);
        if !status.is_success() {
            return Err(classify_failure(
                shown,
                status,
                &headers,
                &body,
                SystemTime::now(),
                &known,
            ));
        }

        let statuses = element_statuses(&body, &known);
        if statuses.len() != members.len() {
            // Nothing says which elements were applied; sending the whole batch again is
            // harmless, since elements already done answer 201.
            return Err(DeliveryError::Retryable {
                message: format!(
                    "{shown} answered {status} with {} element statuses for {} elements sent",
                    statuses.len(),
                    members.len()
                ),
            });
        }
        let statuses = match statuses.into_iter().collect::<Result<Vec<_>, u16>>() {
            Ok(statuses) => statuses,
            Err(code) => {
                // Sending the whole batch again is harmless: elements already done answer 201.
                let message = format!(
                    "{shown} answered {status} but left elements unprocessed with status {code}"
                );
                return Err(if code == 429 {
                    DeliveryError::RateLimited {
                        wait: http::retry_after(&headers, SystemTime::now()),
                        message,
                    }
                } else {
                    DeliveryError::Retryable { message }
                });
            }
        };
        for (member, status) in members.iter().zip(statuses) {
            match status {
                ElementStatus::Done => outcome.accepted.push(member.key.to_owned()),
                ElementStatus::Refused(reason) => outcome.rejected.push(Rejection {
                    key: member.key.to_owned(),
                    reason,
                }),
            }
        }
        Ok(outcome)
    }

    /// The element of each member with at least one usable id, and an outcome holding a
    /// rejection for every member that has none.
    fn prepare<'a>(&self, batch: &'a Batch) -> (Vec<Prepared<'a>>, Outcome) {
        members::prepare(batch, "linkedin", "identifier", |member| {
            let element = self.element(member)?;
            Ok(Prepared {
                key: &member.key,
                element,
            })
        })
    }

    /// One member's element without its action; the reasons when no id is usable.
    fn element(&self, member: &Member) -> Result<Map<String, Value>, String> {
        let mut element = Map::new();
        let mut user_ids = Vec::new();
        let mut identified = false;
        let mut reasons = Vec::new();
        for (field, identifier) in &self.fields {
            let Some(raw) = member.identifiers.get(identifier) else {
                if field.identifies() {
                    reasons.push(format!(
                        "{} (`{identifier}`) {}",
                        field.name(),
                        Invalid::Missing
                    ));
                }
                continue;
            };
            let result = match field {
                Field::Email => email_id(raw).map(|(id_type, value)| {
                    user_ids.push(json!({ "idType": id_type, "idValue": value }));
                }),
                Field::GoogleAid => identifiers::clear(raw).map(|value| {
                    user_ids.push(json!({ "idType": "GOOGLE_AID", "idValue": value }));
                }),
                Field::WebsiteDomain => website_domain(raw).map(|value| {
                    element.insert("companyWebsiteDomain".into(), json!(value));
                }),
                Field::Organization => organization_urn(raw).map(|value| {
                    element.insert("organizationUrn".into(), json!(value));
                }),
                Field::FirstName => clear_into(&mut element, "firstName", raw),
                Field::LastName => clear_into(&mut element, "lastName", raw),
                Field::Title => clear_into(&mut element, "title", raw),
                Field::Company => clear_into(&mut element, "company", raw),
                Field::CompanyName => clear_into(&mut element, "companyName", raw),
            };
            match result {
                Ok(()) => identified |= field.identifies(),
                Err(invalid) if field.identifies() => {
                    reasons.push(format!("{} (`{identifier}`) {invalid}", field.name()));
                }
                // A blank name or title is left out; it identifies nobody.
                Err(_) => {}
            }
        }
        if !identified {
            return Err(format!("no usable identifier: {}", reasons.join("; ")));
        }
        if self.segment_type == SegmentType::User {
            element.insert("userIds".into(), Value::Array(user_ids));
        }
        Ok(element)
    }
}

/// Puts the trimmed `raw` into `element` at `name`, unless it is blank.
fn clear_into(element: &mut Map<String, Value>, name: &str, raw: &str) -> Result<(), Invalid> {
    let value = identifiers::clear(raw)?;
    element.insert(name.to_owned(), json!(value));
    Ok(())
}

impl Connector for LinkedInConnector {
    fn destination(&self) -> Option<String> {
        Some(format!("the LinkedIn segment at {}", self.url))
    }

    fn kind(&self) -> &'static str {
        "linkedin"
    }

    fn max_batch_size(&self) -> usize {
        self.batch_size
    }

    fn deliver<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<Outcome, DeliveryError>> {
        Box::pin(self.send(batch))
    }
}

/// The status of each element of a `BATCH_CREATE` answer, in order, `Err` with the status
/// of an element left unprocessed; empty when the answer holds no readable `elements`.
/// Refusal reasons are quoted without personal data or the `known` identifier values.
fn element_statuses(body: &[u8], known: &[&str]) -> Vec<Result<ElementStatus, u16>> {
    let Ok(answer) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let Some(elements) = answer["elements"].as_array() else {
        return Vec::new();
    };
    elements
        .iter()
        .map(|element| {
            let status = element["status"].as_u64().unwrap_or(0);
            match status {
                200..=299 => Ok(ElementStatus::Done),
                429 | 500..=599 => Err(u16::try_from(status).unwrap_or(500)),
                _ => {
                    let error = &element["error"];
                    let message = error["message"]
                        .as_str()
                        .or_else(|| element["message"].as_str())
                        .unwrap_or("no message");
                    let code = error["code"]
                        .as_str()
                        .map(|code| format!(" {code}"))
                        .unwrap_or_default();
                    Ok(ElementStatus::Refused(format!(
                        "LinkedIn refused the element (status {status}{code}): {}",
                        quote(&http::redact(message, known))
                    )))
                }
            }
        })
        .collect()
}

/// The failure a non-2xx answer stands for; personal data and the `known` identifier values
/// are blanked from the quoted text.
fn classify_failure(
    shown_url: &str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
    known: &[&str],
) -> DeliveryError {
    let text = String::from_utf8_lossy(body);
    let error: Option<Value> = serde_json::from_slice::<Value>(body)
        .ok()
        .filter(|value| value["message"].is_string());
    let message = match &error {
        Some(error) => {
            let code = error["code"]
                .as_str()
                .map(|code| format!(" ({code})"))
                .unwrap_or_default();
            format!(
                "{shown_url} answered {status}: {}{code}",
                quote(&http::redact(
                    error["message"].as_str().unwrap_or_default(),
                    known
                ))
            )
        }
        None if text.trim_start().starts_with('<') => {
            format!("{shown_url} answered {status} with an HTML page instead of a LinkedIn error")
        }
        None => format!(
            "{shown_url} answered {status}: {}",
            quote(&http::redact(&text, known))
        ),
    };
    match status.as_u16() {
        429 => DeliveryError::RateLimited {
            wait: http::retry_after(headers, now),
            message,
        },
        401 => DeliveryError::Auth {
            message: format!("{message}; renew the access token in `access_token_env`"),
        },
        403 => DeliveryError::Auth {
            message: format!(
                "{message}; the token needs the rw_dmp_segments scope and its member a \
                 non-viewer role on the segment's ad account"
            ),
        },
        404 => DeliveryError::Permanent {
            message: format!("{message}; check `segment_id` and `segment_type`"),
        },
        408 | 500 | 502..=599 => DeliveryError::Retryable { message },
        _ => DeliveryError::Permanent { message },
    }
}

/// The access token, in `access_token_env`.
const ACCESS_TOKEN: HeaderSecret = HeaderSecret {
    name: "access_token",
    holds: "a LinkedIn access token with the rw_dmp_segments scope",
    called: "the access token",
    prefix: None,
};

/// The checked connection settings, `None` when any is wrong (the problems say which).
fn read_connection(
    problems: &mut Problems,
    table: &toml::Table,
    secrets: &BTreeMap<String, String>,
) -> Option<ConnectionSettings> {
    problems.reject_unknown_keys(table, Place::Connection, CONNECTION_KEYS);
    let access_token = problems.header_secret(table, secrets, ACCESS_TOKEN);
    let base_url = problems.base_url(table, DEFAULT_BASE_URL);
    let linkedin_version = read_linkedin_version(problems, table);
    let batch_size = problems.batch_size(table, BATCH_SIZE);
    let client = problems.http_client(table, "base_url", TIMEOUT_SECONDS);
    Some(ConnectionSettings {
        client: client?,
        base_url: base_url?,
        access_token: access_token?,
        linkedin_version: linkedin_version?,
        batch_size,
    })
}

/// `linkedin_version`, `YYYYMM`, or the default.
fn read_linkedin_version(problems: &mut Problems, table: &toml::Table) -> Option<String> {
    let version = match table.get("linkedin_version") {
        None => return Some(DEFAULT_LINKEDIN_VERSION.to_owned()),
        Some(toml::Value::Integer(number)) => number.to_string(),
        Some(_) => problems.string(table, Place::Connection, "linkedin_version")?,
    };
    let month = version.get(4..).and_then(|month| month.parse::<u8>().ok());
    let shaped = version.len() == 6
        && version.bytes().all(|b| b.is_ascii_digit())
        && version.starts_with("20")
        && month.is_some_and(|month| (1..=12).contains(&month));
    if shaped {
        Some(version)
    } else {
        problems.push(
            "linkedin_version",
            format!(
                "expected a LinkedIn API version as YYYYMM such as `{DEFAULT_LINKEDIN_VERSION}`, \
                 got `{version}`"
            ),
        );
        None
    }
}

/// The checked activation settings, `None` when any is wrong (the problems say which).
fn read_activation(problems: &mut Problems, table: &toml::Table) -> Option<ActivationSettings> {
    problems.reject_unknown_keys(table, Place::Activation, ACTIVATION_KEYS);
    let segment_id = problems.numeric_id(
        table,
        "segment_id",
        "missing; set it to the DMP segment's numeric id",
        "expected the DMP segment's numeric id, digits only",
    );
    let segment_type = match problems
        .string(table, Place::Activation, "segment_type")
        .as_deref()
    {
        None | Some("user") => Some(SegmentType::User),
        Some("company") => Some(SegmentType::Company),
        Some(other) => {
            problems.push(
                "segment_type",
                format!("expected `user` or `company`, got `{other}`"),
            );
            None
        }
    };
    let fields = segment_type.and_then(|kind| read_fields(problems, table, kind));
    Some(ActivationSettings {
        segment_id: segment_id?,
        segment_type: segment_type?,
        fields: fields?,
    })
}

/// `identifiers` for a segment of `kind`, in wire order.
fn read_fields(
    problems: &mut Problems,
    table: &toml::Table,
    kind: SegmentType,
) -> Option<Vec<(Field, String)>> {
    let known = kind.fields();
    let names: Vec<&str> = known.iter().map(|field| field.name()).collect();
    let unknown = format!(
        "not a field of a {} segment; known: {}",
        match kind {
            SegmentType::User => "user",
            SegmentType::Company => "company",
        },
        names.join(", ")
    );
    let parse = |name: &str| known.iter().find(|field| field.name() == name).copied();
    let example = "{ email = \"email\" }";
    let Some(fields) = problems.identifier_table(table, "identifiers", example, parse, &unknown)
    else {
        let default = match kind {
            SegmentType::User => (Field::Email, "email"),
            SegmentType::Company => (Field::WebsiteDomain, "website"),
        };
        return Some(vec![(default.0, default.1.to_owned())]);
    };
    if fields.ok && !fields.pairs.iter().any(|(field, _)| field.identifies()) {
        let ids: Vec<&str> = known
            .iter()
            .filter(|field| field.identifies())
            .map(|field| field.name())
            .collect();
        problems.push(
            "identifiers",
            format!("maps no id; map at least one of {}", ids.join(", ")),
        );
        return None;
    }
    fields.ok.then_some(fields.pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn website_domains_lose_scheme_www_and_path() {
        assert_eq!(
            website_domain(" https://www.Example.com/about?x=1 "),
            Ok("example.com".into())
        );
        assert_eq!(
            website_domain("shop.example.co.uk"),
            Ok("shop.example.co.uk".into())
        );
        assert_eq!(
            website_domain("localhost"),
            Err(Invalid::Malformed {
                expected: "a website domain such as `example.com`"
            })
        );
        assert_eq!(website_domain(" "), Err(Invalid::Empty));
    }

    #[test]
    fn organizations_are_urns_from_the_urn_or_the_id() {
        assert_eq!(
            organization_urn("1337"),
            Ok("urn:li:organization:1337".into())
        );
        assert_eq!(
            organization_urn("urn:li:organization:1337"),
            Ok("urn:li:organization:1337".into())
        );
        assert!(organization_urn("urn:li:company:1337").is_err());
    }

    #[test]
    fn statuses_are_classified_by_what_sending_again_would_do() {
        let kind = |code: u16, body: &[u8]| {
            let status = StatusCode::from_u16(code).unwrap();
            crate::error_kind(&classify_failure(
                "u",
                status,
                &HeaderMap::new(),
                body,
                SystemTime::now(),
                &[],
            ))
        };
        let error = br#"{"status": 400, "code": "X", "message": "m"}"#;

        assert_eq!(kind(429, b""), "rate limited");
        assert_eq!(kind(401, error), "auth");
        assert_eq!(kind(403, error), "auth");
        assert_eq!(kind(400, error), "permanent");
        assert_eq!(kind(404, error), "permanent");
        assert_eq!(kind(500, b""), "retryable");
        assert_eq!(kind(504, b"<html>gateway</html>"), "retryable");
        assert_eq!(kind(501, b""), "permanent");
    }

    #[test]
    fn linkedin_versions_are_year_and_month() {
        let check = |value: toml::Value| {
            let mut table = toml::Table::new();
            table.insert("linkedin_version".into(), value);
            let mut problems = Problems::default();
            read_linkedin_version(&mut problems, &table)
        };

        assert_eq!(check("202610".into()), Some("202610".into()));
        assert_eq!(check(202501.into()), Some("202501".into()));
        assert_eq!(check("202613".into()), None);
        assert_eq!(check("2026-10".into()), None);
    }
}
