//! The `mailchimp` connector: members of a Mailchimp audience (list), Marketing API v3.
//!
//! This module owns the requests (batch subscribe `POST {base}/lists/{list_id}` for adds and
//! for unsubscribing removes; `DELETE {base}/lists/{list_id}/members/{subscriber_hash}` per
//! member for archiving removes), the reading of per-member errors out of a 200 answer, and
//! the classification of failures, including the body-less 403 Mailchimp sends when it
//! throttles. It does not manage static segments or tags, poll `/batches`, or retry;
//! [`crate::deliver_with_retries`] retries.
//!
//! Adds upsert with `status: "subscribed"` and `update_existing: true`, so adding a member
//! twice leaves one subscribed member. Unsubscribing removes do the same with
//! `status: "unsubscribed"`; an address Mailchimp did not know is then kept as unsubscribed.
//! Archiving removes are one request per member, sent one after the other to stay well under
//! Mailchimp's ten connections per account; archiving an absent member counts as done once a
//! `GET {base}/lists/{list_id}` has shown the list exists (Mailchimp answers 404 for a missing
//! list too).
//!
//! Addresses travel in clear (Mailchimp does not take hashes); they are trimmed and
//! lower-cased first, which is also what the subscriber hash (MD5 of the lower-cased address)
//! is computed from. Rejection reasons and error messages never quote an address.

use std::collections::BTreeMap;
use std::time::SystemTime;

use md5::{Digest, Md5};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{StatusCode, Url};

use crate::http::{self, Secret, quote};
use crate::members::{self, Addressed};
use crate::settings::{self, Limit, Place, Problems};
use crate::{
    Batch, BoxFuture, Change, Connector, DeliveryError, Outcome, Rejection, SettingsError,
};

/// Connection keys the Mailchimp connector knows.
const CONNECTION_KEYS: &[&str] = &["api_key_env", "base_url", "batch_size", "timeout_seconds"];
/// Activation keys the Mailchimp connector knows.
const ACTIVATION_KEYS: &[&str] = &["list_id", "remove_action", "email_identifier"];
/// `batch_size`: the most members one batch-subscribe request takes, and the default.
const BATCH_SIZE: Limit = Limit {
    default: 500,
    max: 500,
};
/// `timeout_seconds`, seconds a request may take; at most 120, after which Mailchimp itself
/// gives up.
const TIMEOUT_SECONDS: Limit = Limit {
    default: 60,
    max: 120,
};
/// The member identifier holding the e-mail address unless `email_identifier` says otherwise.
const DEFAULT_EMAIL_IDENTIFIER: &str = "email";
/// The user name sent with the API key; Mailchimp ignores it.
const BASIC_AUTH_USER: &str = "segmentd";
/// How much of a 200 answer is read at most; a 500-member answer is well under this.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// What a removal does to a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RemoveAction {
    /// The member stays in the audience with the status `unsubscribed`.
    Unsubscribe,
    /// The member is archived (`DELETE` on the member); it can be added again later.
    Archive,
}

/// Adds and removes members of one Mailchimp audience.
///
/// Connection settings:
/// - `api_key_env` (required): the environment variable holding the API key, which ends with
///   its data centre (`...-us6`); the engine passes its value as the `api_key` secret.
/// - `base_url`: the API root, default `https://<dc>.api.mailchimp.com/3.0` from the key.
/// - `batch_size`: members per request, 1 to 500, default 500.
/// - `timeout_seconds`: per request, 1 to 120, default 60.
///
/// Activation settings:
/// - `list_id` (required): the audience's list id.
/// - `remove_action`: `unsubscribe` (default) or `archive`.
/// - `email_identifier`: the member identifier holding the e-mail address, default `email`.
#[derive(Debug, Clone)]
pub struct MailchimpConnector {
    /// The HTTP client, with the connection's timeout.
    client: reqwest::Client,
    /// `{base}/lists/{list_id}`.
    list_url: Url,
    /// The API key, sent as the Basic password.
    api_key: Secret,
    /// What a removal does (`remove_action`).
    remove_action: RemoveAction,
    /// The member identifier holding the address (`email_identifier`).
    email_identifier: String,
    /// Members per request (`batch_size`).
    batch_size: usize,
}

/// The connection's settings, checked.
struct ConnectionSettings {
    /// The HTTP client, with `timeout_seconds` applied.
    client: reqwest::Client,
    /// `base_url`, or the API root of the key's data centre.
    base_url: Url,
    /// The value of the variable `api_key_env` names.
    api_key: Secret,
    /// `batch_size`.
    batch_size: usize,
}

/// The activation's settings, checked.
struct ActivationSettings {
    /// `list_id`.
    list_id: String,
    /// `remove_action`.
    remove_action: RemoveAction,
    /// `email_identifier`.
    email_identifier: String,
}

impl MailchimpConnector {
    /// Builds the connector from its connection and activation settings and the resolved
    /// secrets (`api_key`), returning every problem found.
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
        MailchimpConnector {
            client: connection.client,
            list_url: http::endpoint(&connection.base_url, &["lists", &activation.list_id]),
            api_key: connection.api_key,
            remove_action: activation.remove_action,
            email_identifier: activation.email_identifier,
            batch_size: connection.batch_size,
        }
    }

    /// Sends one batch once and classifies the answers.
    async fn send(&self, batch: &Batch) -> Result<Outcome, DeliveryError> {
        let (members, mut outcome) = self.prepare(batch);
        if members.is_empty() {
            return Ok(outcome);
        }
        let sent = match (batch.change, self.remove_action) {
            (Change::Add, _) => self.batch_subscribe(&members, "subscribed").await?,
            (Change::Remove, RemoveAction::Unsubscribe) => {
                self.batch_subscribe(&members, "unsubscribed").await?
            }
            (Change::Remove, RemoveAction::Archive) => self.archive(&members).await?,
            (Change::Replace, _) => return Err(crate::cannot_replace(self.kind())),
        };
        outcome.accepted.extend(sent.accepted);
        outcome.rejected.extend(sent.rejected);
        Ok(outcome)
    }

    /// The members with a usable address, and an outcome rejecting those without one.
    fn prepare<'a>(&self, batch: &'a Batch) -> (Vec<Addressed<'a>>, Outcome) {
        members::prepare(batch, self.kind(), "e-mail address", |member| {
            members::addressed(member, &self.email_identifier)
        })
    }

    /// Sends `members` with `status` through batch subscribe, updating existing members.
    async fn batch_subscribe(
        &self,
        members: &[Addressed<'_>],
        status: &str,
    ) -> Result<Outcome, DeliveryError> {
        let mut addresses: Vec<&str> = members.iter().map(|m| m.email.as_str()).collect();
        addresses.sort_unstable();
        addresses.dedup();
        let body = serde_json::json!({
            "members": addresses
                .iter()
                .map(|email| serde_json::json!({"email_address": email, "status": status}))
                .collect::<Vec<_>>(),
            "update_existing": true,
        });
        let response = self
            .client
            .post(self.list_url.clone())
            .basic_auth(BASIC_AUTH_USER, Some(self.api_key.expose()))
            .json(&body)
            .send()
            .await
            .map_err(|error| http::transport_failure("POST", self.list_url.as_str(), error))?;

        let status = response.status();
        let headers = response.headers().clone();
        let body = http::body_start(response, MAX_ANSWER_BYTES).await;
        let shown = self.list_url.as_str();
        if !status.is_success() {
            let emails: Vec<&str> = members.iter().map(|member| member.email.as_str()).collect();
            return Err(classify_failure(
                status,
                &headers,
                &body,
                shown,
                SystemTime::now(),
                &emails,
            ));
        }
        let answer: BatchAnswer =
            serde_json::from_slice(&body).map_err(|error| DeliveryError::Retryable {
                message: format!("{shown} answered {status} with an unreadable body: {error}"),
            })?;

        let mut refused: BTreeMap<String, String> = BTreeMap::new();
        for error in answer.errors {
            let email = error.email_address.trim().to_lowercase();
            let reason = member_error_reason(&error, &email);
            refused.insert(email, reason);
        }
        let mut outcome = Outcome::default();
        for member in members {
            match refused.get(&member.email) {
                Some(reason) => outcome.rejected.push(Rejection {
                    key: member.key.to_owned(),
                    reason: reason.clone(),
                }),
                None => outcome.accepted.push(member.key.to_owned()),
            }
        }
        Ok(outcome)
    }

    /// Archives `members` one request at a time. A failure of the whole request (throttling,
    /// credentials, server) fails the batch; sending it again archives the rest, and the
    /// members already archived answer 404, which counts as done.
    ///
    /// Mailchimp also answers 404 when the list itself does not exist, so the first 404 of a
    /// batch is followed by a `GET` on the list: a list that is not there fails the batch.
    async fn archive(&self, members: &[Addressed<'_>]) -> Result<Outcome, DeliveryError> {
        let mut outcome = Outcome::default();
        let mut list_confirmed = false;
        for member in members {
            let mut url = self.list_url.clone();
            url.path_segments_mut()
                .expect("an http URL has path segments")
                .extend(["members", &subscriber_hash(&member.email)]);
            let response = self
                .client
                .delete(url)
                .basic_auth(BASIC_AUTH_USER, Some(self.api_key.expose()))
                .send()
                .await
                .map_err(|error| {
                    http::transport_failure("DELETE", self.members_shown().as_str(), error)
                })?;

            let status = response.status();
            if status == StatusCode::NOT_FOUND && !list_confirmed {
                self.confirm_list().await?;
                list_confirmed = true;
            }
            if status.is_success() || status == StatusCode::NOT_FOUND {
                outcome.accepted.push(member.key.to_owned());
                continue;
            }
            let headers = response.headers().clone();
            let body = http::body_start(response, http::MAX_ERROR_BODY_BYTES).await;
            let shown = self.members_shown();
            let now = SystemTime::now();
            let failure = classify_failure(status, &headers, &body, &shown, now, &[&member.email]);
            match failure {
                DeliveryError::Permanent { .. } if status == StatusCode::BAD_REQUEST => {
                    let problem = serde_json::from_slice::<Problem>(&body).unwrap_or_default();
                    outcome.rejected.push(Rejection {
                        key: member.key.to_owned(),
                        reason: format!(
                            "Mailchimp refused to archive the member: {}",
                            http::redact_addresses(&redact(&problem.describe(), &member.email))
                        ),
                    });
                }
                other => return Err(other),
            }
        }
        Ok(outcome)
    }

    /// Checks that the list exists (`GET {base}/lists/{list_id}`): a 404 there is a permanent
    /// failure naming `list_id`, any other failure is classified as usual.
    async fn confirm_list(&self) -> Result<(), DeliveryError> {
        let shown = self.list_url.as_str();
        let response = self
            .client
            .get(self.list_url.clone())
            .basic_auth(BASIC_AUTH_USER, Some(self.api_key.expose()))
            .send()
            .await
            .map_err(|error| http::transport_failure("GET", shown, error))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        if status == StatusCode::NOT_FOUND {
            return Err(DeliveryError::Permanent {
                message: format!(
                    "{shown} answered {status}: the list does not exist, so no member could be \
                     archived; check `list_id`"
                ),
            });
        }
        let headers = response.headers().clone();
        let body = http::body_start(response, http::MAX_ERROR_BODY_BYTES).await;
        Err(classify_failure(
            status,
            &headers,
            &body,
            shown,
            SystemTime::now(),
            &[],
        ))
    }

    /// `{base}/lists/{list_id}/members/{subscriber_hash}` with the hash left out, for messages.
    fn members_shown(&self) -> String {
        format!("{}/members/{{subscriber_hash}}", self.list_url)
    }
}

impl Connector for MailchimpConnector {
    fn destination(&self) -> Option<String> {
        Some(format!("the Mailchimp audience at {}", self.list_url))
    }

    fn kind(&self) -> &'static str {
        "mailchimp"
    }

    fn max_batch_size(&self) -> usize {
        self.batch_size
    }

    fn deliver<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<Outcome, DeliveryError>> {
        Box::pin(self.send(batch))
    }
}

/// The part of a batch-subscribe answer this connector reads; members not listed under
/// `errors` were created or updated.
#[derive(serde::Deserialize)]
struct BatchAnswer {
    #[serde(default)]
    errors: Vec<MemberError>,
}

/// One entry of a batch-subscribe answer's `errors`.
#[derive(serde::Deserialize)]
struct MemberError {
    #[serde(default)]
    email_address: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_code: Option<String>,
}

/// Mailchimp's problem-details error body.
#[derive(Debug, Default, serde::Deserialize)]
struct Problem {
    #[serde(default)]
    title: String,
    #[serde(default)]
    detail: String,
}

impl Problem {
    fn describe(&self) -> String {
        match (self.title.is_empty(), self.detail.is_empty()) {
            (false, false) => format!("{}: {}", self.title, self.detail),
            (false, true) => self.title.clone(),
            (true, _) => self.detail.clone(),
        }
    }
}

/// The MD5 of the lower-cased address, lower-case hex: Mailchimp's member id in URLs.
pub fn subscriber_hash(email: &str) -> String {
    hex::encode(Md5::digest(email.to_lowercase().as_bytes()))
}

/// The rejection reason for one entry of `errors`, without the address.
fn member_error_reason(error: &MemberError, email: &str) -> String {
    let text = redact(&error.error, email);
    let code = error
        .error_code
        .as_deref()
        .map(|code| format!(" ({code})"))
        .unwrap_or_default();
    let lower = text.to_lowercase();
    let hint = if lower.contains("permanently deleted") || lower.contains("forgotten") {
        "; the address was permanently deleted from Mailchimp and only comes back if the \
         person signs up again"
    } else if lower.contains("signed up to a lot of lists very recently") {
        "; Mailchimp defers this address for hours or days, add it again later"
    } else if lower.contains("compliance state") {
        "; the address is in compliance state and Mailchimp will not subscribe it"
    } else {
        ""
    };
    format!(
        "Mailchimp refused the member{code}: {}{hint}",
        quote(&http::redact_addresses(&text))
    )
}

/// `text` with every occurrence of `email` (ASCII case ignored) replaced by `<address>`.
fn redact(text: &str, email: &str) -> String {
    if email.is_empty() {
        return text.to_owned();
    }
    let lower = text.to_ascii_lowercase();
    let mut redacted = String::with_capacity(text.len());
    let mut rest = 0;
    while let Some(found) = lower[rest..].find(email) {
        let start = rest + found;
        redacted.push_str(&text[rest..start]);
        redacted.push_str("<address>");
        rest = start + email.len();
    }
    redacted.push_str(&text[rest..]);
    redacted
}

/// The failure a non-2xx answer stands for; personal data and the batch's `emails` are
/// blanked from the quoted text.
fn classify_failure(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    shown_url: &str,
    now: SystemTime,
    emails: &[&str],
) -> DeliveryError {
    let problem = serde_json::from_slice::<Problem>(body).ok();
    let said = match &problem {
        Some(problem) => quote(&http::redact(&problem.describe(), emails)),
        None => quote(&http::redact(&String::from_utf8_lossy(body), emails)),
    };
    let message = format!("{shown_url} answered {status}: {said}");
    match status.as_u16() {
        429 => DeliveryError::RateLimited {
            wait: headers
                .get(RETRY_AFTER)
                .and_then(|value| http::requested_wait(value, now)),
            message,
        },
        403 if problem.is_none() => DeliveryError::RateLimited {
            wait: None,
            message: format!(
                "{shown_url} answered {status} without an error body, which is how Mailchimp \
                 throttles under heavy load"
            ),
        },
        // A disabled user or key, or a key sent to another data centre: an operator must act.
        403 => DeliveryError::Auth {
            message: format!(
                "{message}; check that the API key is enabled and that its data centre suffix \
                 matches the account"
            ),
        },
        401 => DeliveryError::Auth {
            message: format!("{message}; check the API key in `api_key_env`"),
        },
        404 => DeliveryError::Permanent {
            message: format!("{message}; check `list_id`"),
        },
        408 => DeliveryError::Retryable { message },
        501 => DeliveryError::Permanent { message },
        500..=599 => DeliveryError::Retryable { message },
        _ => DeliveryError::Permanent { message },
    }
}

/// The data centre an API key ends with (`us6` for `...-us6`), if it has one.
fn data_centre(api_key: &str) -> Option<&str> {
    let (_, dc) = api_key.rsplit_once('-')?;
    let shaped = !dc.is_empty()
        && dc
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && dc.bytes().next().is_some_and(|b| b.is_ascii_lowercase());
    shaped.then_some(dc)
}

/// The checked connection settings, `None` when any is wrong (the problems say which).
fn read_connection(
    problems: &mut Problems,
    table: &toml::Table,
    secrets: &BTreeMap<String, String>,
) -> Option<ConnectionSettings> {
    problems.reject_unknown_keys(table, Place::Connection, CONNECTION_KEYS);
    let api_key = problems.secret(table, secrets, "api_key", "a Mailchimp API key");
    let dc = api_key.as_deref().and_then(|key| {
        let dc = data_centre(key);
        if dc.is_none() {
            problems.push(
                "api_key_env",
                "the API key does not end with a data centre such as `-us6`; copy the whole key \
                 from Mailchimp",
            );
        }
        dc
    });
    let base_url = match table.contains_key("base_url") {
        true => problems.http_url(table, Place::Connection, "base_url"),
        false => dc.map(|dc| {
            Url::parse(&format!("https://{dc}.api.mailchimp.com/3.0"))
                .expect("a data centre of letters and digits makes a valid host")
        }),
    };
    let batch_size = problems.batch_size(table, BATCH_SIZE);
    let client = problems.http_client(table, "base_url", TIMEOUT_SECONDS);
    dc?;
    Some(ConnectionSettings {
        client: client?,
        base_url: base_url?,
        api_key: Secret(api_key?),
        batch_size,
    })
}

/// The checked activation settings, `None` when any is wrong (the problems say which).
fn read_activation(problems: &mut Problems, table: &toml::Table) -> Option<ActivationSettings> {
    problems.reject_unknown_keys(table, Place::Activation, ACTIVATION_KEYS);
    let list_id = match problems.string(table, Place::Activation, "list_id") {
        Some(id) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()) => Some(id),
        Some(id) => {
            problems.push(
                "list_id",
                format!("expected a Mailchimp list id of letters and digits, got `{id}`"),
            );
            None
        }
        None => {
            if !table.contains_key("list_id") {
                problems.push("list_id", "missing; set it to the audience's list id");
            }
            None
        }
    };
    let remove_action = match problems
        .string(table, Place::Activation, "remove_action")
        .as_deref()
    {
        None | Some("unsubscribe") => Some(RemoveAction::Unsubscribe),
        Some("archive") => Some(RemoveAction::Archive),
        Some(other) => {
            problems.push(
                "remove_action",
                format!("expected `unsubscribe` or `archive`, got `{other}`"),
            );
            None
        }
    };
    let email_identifier = problems
        .string(table, Place::Activation, "email_identifier")
        .unwrap_or_else(|| DEFAULT_EMAIL_IDENTIFIER.to_owned());
    Some(ActivationSettings {
        list_id: list_id?,
        remove_action: remove_action?,
        email_identifier,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subscriber_hash_is_the_md5_of_the_lower_cased_address() {
        // Computed outside this code with `printf '%s' test@example.com | md5sum`.
        assert_eq!(
            subscriber_hash("Test@Example.com"),
            "55502f40dc8b7c769880b10874abc9d0"
        );
    }

    #[test]
    fn the_data_centre_is_the_suffix_after_the_last_dash() {
        assert_eq!(
            data_centre("0123456789abcdef0123456789abcdef-us6"),
            Some("us6")
        );
        assert_eq!(data_centre("0123456789abcdef0123456789abcdef"), None);
        assert_eq!(data_centre("0123456789abcdef-"), None);
        assert_eq!(data_centre("0123456789abcdef-6us"), None);
    }

    #[test]
    fn the_base_url_is_derived_from_the_key_unless_set() {
        let connection = toml::toml! { api_key_env = "MAILCHIMP_KEY" };
        let activation = toml::toml! { list_id = "a1b2c3" };
        let secrets = BTreeMap::from([(
            "api_key".to_owned(),
            "0123456789abcdef0123456789abcdef-us6".to_owned(),
        )]);

        let connector =
            MailchimpConnector::from_settings(&connection, &activation, &secrets).unwrap();

        assert_eq!(
            connector.list_url.as_str(),
            "https://us6.api.mailchimp.com/3.0/lists/a1b2c3"
        );
        assert!(!format!("{connector:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn addresses_are_redacted_from_mailchimp_messages() {
        let text = "Ann@Example.com was permanently deleted; ann@example.com cannot be re-imported";

        assert_eq!(
            redact(text, "ann@example.com"),
            "<address> was permanently deleted; <address> cannot be re-imported"
        );
    }

    #[test]
    fn statuses_are_classified_by_what_sending_again_would_do() {
        let problem = br#"{"title": "Forbidden", "status": 403, "detail": "no"}"#;
        let kind = |code: u16, body: &[u8]| {
            let status = StatusCode::from_u16(code).unwrap();
            crate::error_kind(&classify_failure(
                status,
                &HeaderMap::new(),
                body,
                "u",
                SystemTime::now(),
                &[],
            ))
        };

        assert_eq!(kind(403, b""), "rate limited");
        assert_eq!(kind(403, problem), "auth");
        assert_eq!(kind(429, b""), "rate limited");
        assert_eq!(kind(401, problem), "auth");
        assert_eq!(kind(400, problem), "permanent");
        assert_eq!(kind(404, problem), "permanent");
        assert_eq!(kind(500, b""), "retryable");
        assert_eq!(kind(501, b""), "permanent");
        assert_eq!(kind(503, b"<html>busy</html>"), "retryable");
    }
}
