//! The Braze connector against a fake Braze REST API on loopback.
//!
//! The fake serves `POST /users/track` and `POST /v2/subscription/status/set` the way Braze
//! does: a bearer REST API key; at most 75 attributes objects and 50 users per subscription
//! group entry; one identifier per attributes object; phones in E.164; `add` / `remove` on an
//! array custom attribute as set operations; `_update_existing_only` honoured; a 201 carrying
//! non-fatal `errors` by index; `X-RateLimit-*` headers on every answer. It keeps user profiles
//! (external id, e-mail, phone, array attributes, subscription states). Faults queued on it
//! answer the next requests the way Braze fails.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use segmentd_connectors::braze::BrazeConnector;
use segmentd_connectors::{
    Batch, Change, Connector, DeliveryError, Member, Outcome, Rejection, SettingsError,
};
use serde_json::{Value, json};
use tokio::time::Instant;

mod common;
use common::{
    Fake, accepted, deliver_retrying, header, html, member, strings as ids, unix_now,
    with_retry_after,
};

const KEY: &str = "b7d3c6a0-5f1e-4e2a-9c1b-2d8f7e6a5b4c";
const ATTRIBUTE: &str = "segments";
const VALUE: &str = "vip";
const GROUP: &str = "3f4b1a2c-9d8e-4f70-a1b2-c3d4e5f60718";
const MAX_ATTRIBUTE_OBJECTS: usize = 75;
const MAX_GROUP_USERS: usize = 50;
/// The rate limit the fake announces in `X-RateLimit-Limit`.
const RATE_LIMIT: u64 = 3000;

/// One failure the fake answers a request with instead of its normal answer.
#[derive(Debug, Clone)]
enum Fault {
    /// HTTP 429 with this `Retry-After` if any, and an `X-RateLimit-Reset` this many seconds
    /// ahead if any.
    TooManyRequests {
        retry_after: Option<&'static str>,
        reset_in: Option<u64>,
    },
    /// HTTP 503 with a Braze error body.
    Unavailable,
    /// An HTML error page with this status, as a load balancer in front of the API sends.
    HtmlPage(u16),
    /// The normal answer (the change applied at once), sent after this delay.
    Slow(Duration),
    /// HTTP 202 `{"message": "queued"}`: Braze under maintenance; the change is applied.
    Queued,
    /// HTTP 401: the REST API key was revoked or rotated.
    RevokedKey,
    /// HTTP 403: the key lacks the endpoint's permission.
    MissingPermission,
    /// HTTP 400 whose message quotes an e-mail address and a phone number.
    InvalidContact,
    /// The normal answer (the change applied), plus an error that names no attributes object.
    UnplacedError,
}

/// A request as the fake received it.
#[derive(Debug, Clone)]
struct Received {
    uri: String,
    authorization: Option<String>,
    body: String,
    status: u16,
}

/// One user profile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Profile {
    email: Option<String>,
    phone: Option<String>,
    /// Array custom attributes, each kept as a set.
    arrays: BTreeMap<String, BTreeSet<String>>,
    /// Subscription group id to `subscribed` / `unsubscribed`.
    subscriptions: BTreeMap<String, String>,
}

/// The fake REST API: its profiles, the faults queued and the requests received.
type Braze = Fake<Account, Received, Fault>;

/// The user profiles the fake holds, by external id, and the identifiers it refuses.
struct Account {
    profiles: Mutex<BTreeMap<String, Profile>>,
    /// Identifiers whose attributes object the fake refuses with a non-fatal error.
    refused: Mutex<BTreeSet<String>>,
}

impl Braze {
    /// External ids of the profiles whose `segments` array holds `vip`.
    fn in_segment(&self) -> Vec<String> {
        self.profiles
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, profile)| {
                profile
                    .arrays
                    .get(ATTRIBUTE)
                    .is_some_and(|a| a.contains(VALUE))
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// External id to subscription state in [`GROUP`], for profiles that have one.
    fn group_states(&self) -> BTreeMap<String, String> {
        self.profiles
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(id, profile)| {
                Some((id.clone(), profile.subscriptions.get(GROUP)?.clone()))
            })
            .collect()
    }

    fn profile(&self, external_id: &str) -> Profile {
        self.profiles.lock().unwrap()[external_id].clone()
    }
}

/// Adds the `X-RateLimit-*` headers Braze sends on every answer.
fn with_rate_limit_headers(mut response: Response, remaining: u64, reset_in: u64) -> Response {
    let reset = unix_now() + reset_in;
    let headers = response.headers_mut();
    headers.insert("x-ratelimit-limit", RATE_LIMIT.into());
    headers.insert("x-ratelimit-remaining", remaining.into());
    headers.insert("x-ratelimit-reset", reset.into());
    response
}

fn fatal(status: u16, message: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        axum::Json(json!({ "message": message })),
    )
        .into_response()
}

/// Answers with `fault` if it stands for a failure, otherwise checks the key.
fn refusal(fault: Option<&Fault>, headers: &HeaderMap) -> Option<Response> {
    match fault {
        Some(Fault::TooManyRequests {
            retry_after,
            reset_in,
        }) => {
            let mut response = fatal(429, "Rate limit exceeded");
            if let Some(reset_in) = reset_in {
                response = with_rate_limit_headers(response, 0, *reset_in);
            }
            return Some(with_retry_after(response, *retry_after));
        }
        Some(Fault::Unavailable) => return Some(fatal(503, "Service Unavailable")),
        Some(Fault::HtmlPage(status)) => {
            let page = "<html><head><title>502 Bad Gateway</title></head>\
                        <body><center><h1>502 Bad Gateway</h1></center></body></html>";
            return Some(html(*status, page, "text/html"));
        }
        Some(Fault::RevokedKey) => return Some(fatal(401, "Invalid API Key")),
        Some(Fault::MissingPermission) => {
            return Some(fatal(
                403,
                "Access denied: the API key does not have permission for this endpoint",
            ));
        }
        Some(Fault::InvalidContact) => {
            return Some(fatal(
                400,
                "Invalid email ann@example.com, contact support on +44 20 7946 0958",
            ));
        }
        Some(Fault::Slow(_) | Fault::Queued | Fault::UnplacedError) | None => {}
    }
    let expected = format!("Bearer {KEY}");
    let authorization = header(headers, "authorization");
    (authorization != Some(expected.as_str())).then(|| fatal(401, "Invalid API Key"))
}

/// Records the request, then answers after the fault's delay, if any.
async fn record_and_delay(
    braze: &Braze,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    fault: Option<Fault>,
    response: Response,
) -> Response {
    braze.record(Received {
        uri: uri.to_string(),
        authorization: header(headers, "authorization").map(str::to_owned),
        body: String::from_utf8_lossy(body).into_owned(),
        status: response.status().as_u16(),
    });
    if let Some(Fault::Slow(delay)) = fault {
        tokio::time::sleep(delay).await;
    }
    response
}

/// Turns a normal answer into the one the fault asks for, and adds the rate-limit headers.
fn finish(fault: Option<&Fault>, response: Response) -> Response {
    let response = match fault {
        Some(Fault::Queued) if response.status().is_success() => (
            StatusCode::ACCEPTED,
            axum::Json(json!({"message": "queued"})),
        )
            .into_response(),
        Some(Fault::UnplacedError) if response.status().is_success() => (
            StatusCode::CREATED,
            axum::Json(json!({
                "message": "success",
                "errors": [{"type": "internal error while processing bob@example.com"}],
            })),
        )
            .into_response(),
        _ => response,
    };
    with_rate_limit_headers(response, RATE_LIMIT - 1, 3)
}

async fn users_track(
    State(braze): State<Arc<Braze>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = braze.next_fault();
    let response = refusal(fault.as_ref(), &headers)
        .unwrap_or_else(|| finish(fault.as_ref(), track(&braze, &body)));
    record_and_delay(&braze, &uri, &headers, &body, fault, response).await
}

/// The external id of the profile an attributes object or a subscription entry names by
/// `field` (`external_id`, `email` or `phone`), if the fake holds one.
fn find_profile(profiles: &BTreeMap<String, Profile>, field: &str, id: &str) -> Option<String> {
    profiles
        .iter()
        .find(|(external_id, profile)| match field {
            "external_id" => external_id.as_str() == id,
            "email" => profile.email.as_deref() == Some(id),
            "phone" => profile.phone.as_deref() == Some(id),
            _ => false,
        })
        .map(|(external_id, _)| external_id.clone())
}

fn track(braze: &Braze, body: &[u8]) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return fatal(400, "Invalid JSON in request body");
    };
    let Some(objects) = request["attributes"].as_array() else {
        return fatal(
            400,
            "Request must include at least one of attributes, events or purchases",
        );
    };
    if objects.len() > MAX_ATTRIBUTE_OBJECTS {
        return fatal(
            400,
            "Too many attributes objects: the limit is 75 per request",
        );
    }

    let refused = braze.refused.lock().unwrap().clone();
    let mut profiles = braze.profiles.lock().unwrap();
    let mut errors = Vec::new();
    let mut processed = 0;
    for (index, object) in objects.iter().enumerate() {
        let mut error = |kind: String| {
            errors.push(json!({"type": kind, "input_array": "attributes", "index": index}));
        };
        let Some(fields) = object.as_object() else {
            error("attributes object must be an object".into());
            continue;
        };
        let identifying: Vec<(&str, &str)> = ["external_id", "email", "phone"]
            .into_iter()
            .filter_map(|field| Some((field, fields.get(field)?.as_str()?)))
            .collect();
        let [(field, id)] = identifying[..] else {
            error("'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required".into());
            continue;
        };
        if field == "phone" && !(id.starts_with('+') && id[1..].bytes().all(|b| b.is_ascii_digit()))
        {
            error("'phone' must be a valid E.164 phone number".into());
            continue;
        }
        if field == "email" && (!id.contains('@') || id != id.trim()) {
            error("'email' is not a valid email address".into());
            continue;
        }
        if refused.contains(id) {
            error(format!("{id} cannot be updated: the user is blocklisted"));
            continue;
        }
        let Some(operation) = fields.get(ATTRIBUTE).and_then(Value::as_object) else {
            error(format!("'{ATTRIBUTE}' must be an array operation"));
            continue;
        };
        let update_only = fields.get("_update_existing_only") == Some(&json!(true));
        let external_id = match find_profile(&profiles, field, id) {
            Some(external_id) => external_id,
            // Update-only mode leaves unknown users alone without reporting them.
            None if update_only => {
                processed += 1;
                continue;
            }
            None => {
                let external_id = format!("created-{}", profiles.len());
                let profile = Profile {
                    email: (field == "email").then(|| id.to_owned()),
                    phone: (field == "phone").then(|| id.to_owned()),
                    ..Profile::default()
                };
                profiles.insert(external_id.clone(), profile);
                external_id
            }
        };
        let array = profiles
            .get_mut(&external_id)
            .unwrap()
            .arrays
            .entry(ATTRIBUTE.to_owned())
            .or_default();
        for (operator, values) in operation {
            let values = values
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str);
            match operator.as_str() {
                "add" => array.extend(values.map(str::to_owned)),
                "remove" => values.for_each(|value| {
                    array.remove(value);
                }),
                _ => {}
            }
        }
        processed += 1;
    }
    let mut answer = json!({"message": "success", "attributes_processed": processed});
    if !errors.is_empty() {
        answer["errors"] = json!(errors);
    }
    (StatusCode::CREATED, axum::Json(answer)).into_response()
}

async fn subscription_status_set(
    State(braze): State<Arc<Braze>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = braze.next_fault();
    let response = refusal(fault.as_ref(), &headers)
        .unwrap_or_else(|| finish(fault.as_ref(), subscribe(&braze, &body)));
    record_and_delay(&braze, &uri, &headers, &body, fault, response).await
}

fn subscribe(braze: &Braze, body: &[u8]) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return fatal(400, "Invalid JSON in request body");
    };
    let Some(groups) = request["subscription_groups"].as_array() else {
        return fatal(400, "'subscription_groups' is required");
    };
    let mut profiles = braze.profiles.lock().unwrap();
    for group in groups {
        if group["subscription_group_id"] != GROUP {
            return fatal(400, "Invalid subscription_group_id");
        }
        let state = group["subscription_state"].as_str().unwrap_or_default();
        if !["subscribed", "unsubscribed"].contains(&state) {
            return fatal(
                400,
                "'subscription_state' must be 'subscribed' or 'unsubscribed'",
            );
        }
        let lists: Vec<(&str, &Vec<Value>)> = [
            ("external_id", "external_ids"),
            ("email", "emails"),
            ("phone", "phones"),
        ]
        .into_iter()
        .filter_map(|(field, list)| Some((field, group.get(list)?.as_array()?)))
        .collect();
        let [(field, ids)] = lists[..] else {
            return fatal(
                400,
                "Exactly one of external_ids, emails or phones is required",
            );
        };
        if ids.len() > MAX_GROUP_USERS {
            return fatal(
                400,
                "Too many users: the limit is 50 per subscription group",
            );
        }
        for id in ids {
            let id = id.as_str().unwrap_or_default();
            if field == "phone" && !id.starts_with('+') {
                return fatal(400, "Phone numbers must be in E.164 format");
            }
            if let Some(external_id) = find_profile(&profiles, field, id) {
                profiles
                    .get_mut(&external_id)
                    .unwrap()
                    .subscriptions
                    .insert(GROUP.to_owned(), state.to_owned());
            }
        }
    }
    (
        StatusCode::CREATED,
        axum::Json(json!({"message": "success"})),
    )
        .into_response()
}

/// Starts the fake on a loopback port with the profiles `u1`, `u2`, `u3` (ann, bob, cat);
/// returns it with its REST endpoint.
async fn start_braze() -> (Arc<Braze>, String) {
    let profile = |name: &str, phone: &str| Profile {
        email: Some(format!("{name}@example.com")),
        phone: Some(phone.to_owned()),
        ..Profile::default()
    };
    let profiles = BTreeMap::from([
        ("u1".to_owned(), profile("ann", "+447700900001")),
        ("u2".to_owned(), profile("bob", "+447700900002")),
        ("u3".to_owned(), profile("cat", "+447700900003")),
    ]);
    let routes = axum::Router::new()
        .route("/users/track", axum::routing::post(users_track))
        .route(
            "/v2/subscription/status/set",
            axum::routing::post(subscription_status_set),
        );
    common::start(
        Braze::new(Account {
            profiles: Mutex::new(profiles),
            refused: Mutex::new(BTreeSet::new()),
        }),
        routes,
    )
    .await
}

fn secrets(key: &str) -> BTreeMap<String, String> {
    common::secrets(&[("api_key", key)])
}

fn connection(base_url: &str) -> toml::Table {
    let mut table = toml::toml! {
        api_key_env = "BRAZE_REST_KEY"
        timeout_seconds = 1
    };
    table.insert("base_url".into(), base_url.into());
    table
}

fn connector(base_url: &str, activation: toml::Table) -> BrazeConnector {
    BrazeConnector::from_settings(&connection(base_url), &activation, &secrets(KEY)).unwrap()
}

/// `segments` gets `vip`, users matched by external id.
fn by_external_id(base_url: &str) -> BrazeConnector {
    connector(
        base_url,
        toml::toml! {
            attribute = "segments"
            value = "vip"
        },
    )
}

fn by_email(base_url: &str) -> BrazeConnector {
    connector(
        base_url,
        toml::toml! {
            attribute = "segments"
            value = "vip"
            match_by = "email"
        },
    )
}

/// Subscribes users, matched by the `mobile` identifier, to [`GROUP`].
fn group_by_phone(base_url: &str) -> BrazeConnector {
    let mut activation = toml::toml! {
        membership = "subscription_group"
        match_by = "phone"
        identifier = "mobile"
    };
    activation.insert("subscription_group_id".into(), GROUP.into());
    connector(base_url, activation)
}

fn batch(change: Change, members: Vec<Member>) -> Batch {
    common::batch("vip/braze", change, members)
}

fn three_members() -> Vec<Member> {
    vec![
        member("1", &[("external_id", "u1")]),
        member("2", &[("external_id", "u2")]),
        member("3", &[("external_id", "u3")]),
    ]
}

#[tokio::test]
async fn adding_three_and_removing_one_leaves_two_profiles_in_the_segment() {
    let (braze, url) = start_braze().await;
    let connector = by_external_id(&url);

    let added = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let removed = connector
        .deliver(&batch(
            Change::Remove,
            vec![member("2", &[("external_id", "u2")])],
        ))
        .await;

    assert_eq!(added, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(removed, Ok(accepted(&["2"])));
    assert_eq!(braze.in_segment(), ids(&["u1", "u3"]));
}

#[tokio::test]
async fn adding_twice_keeps_the_value_once_and_other_segment_values_stay() {
    let (braze, url) = start_braze().await;
    braze
        .profiles
        .lock()
        .unwrap()
        .get_mut("u1")
        .unwrap()
        .arrays
        .insert(ATTRIBUTE.into(), BTreeSet::from(["newsletter".to_owned()]));
    let connector = by_external_id(&url);

    connector
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();
    let again = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;

    assert_eq!(again, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(braze.in_segment(), ids(&["u1", "u2", "u3"]));
    assert_eq!(
        braze.profile("u1").arrays[ATTRIBUTE],
        BTreeSet::from(["newsletter".to_owned(), "vip".to_owned()])
    );
}

#[tokio::test]
async fn the_key_is_sent_as_a_bearer_token_with_one_update_only_object_per_member() {
    let (braze, url) = start_braze().await;
    let connector = by_external_id(&url);

    connector
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();
    connector
        .deliver(&batch(
            Change::Remove,
            vec![member("3", &[("external_id", " u3 ")])],
        ))
        .await
        .unwrap();

    let received = braze.received();
    assert_eq!(received[0].uri, "/users/track");
    assert_eq!(received[0].authorization, Some(format!("Bearer {KEY}")));
    assert_eq!(
        serde_json::from_str::<Value>(&received[0].body).unwrap(),
        json!({"attributes": [
            {"external_id": "u1", "segments": {"add": ["vip"]}, "_update_existing_only": true},
            {"external_id": "u2", "segments": {"add": ["vip"]}, "_update_existing_only": true},
            {"external_id": "u3", "segments": {"add": ["vip"]}, "_update_existing_only": true},
        ]})
    );
    assert_eq!(
        serde_json::from_str::<Value>(&received[1].body).unwrap(),
        json!({"attributes": [
            {"external_id": "u3", "segments": {"remove": ["vip"]}, "_update_existing_only": true},
        ]})
    );
    assert!(!format!("{connector:?}").contains(KEY));
    assert_eq!(braze.in_segment(), ids(&["u1", "u2"]));
}

#[tokio::test]
async fn emails_are_trimmed_and_lower_cased_so_a_removal_written_differently_matches() {
    let (braze, url) = start_braze().await;
    let connector = by_email(&url);

    connector
        .deliver(&batch(
            Change::Add,
            vec![member("1", &[("email", "  Ann@Example.COM ")])],
        ))
        .await
        .unwrap();
    assert_eq!(braze.in_segment(), ids(&["u1"]));
    connector
        .deliver(&batch(
            Change::Remove,
            vec![member("1", &[("email", "ann@example.com")])],
        ))
        .await
        .unwrap();

    let body: Value = serde_json::from_str(&braze.received()[0].body).unwrap();
    assert_eq!(body["attributes"][0]["email"], "ann@example.com");
    assert!(braze.in_segment().is_empty());
}

#[tokio::test]
async fn a_user_braze_does_not_know_is_not_created() {
    let (braze, url) = start_braze().await;

    let outcome = by_external_id(&url)
        .deliver(&batch(
            Change::Add,
            vec![
                member("1", &[("external_id", "u1")]),
                member("9", &[("external_id", "u9")]),
            ],
        ))
        .await;

    assert_eq!(outcome, Ok(accepted(&["1", "9"])));
    assert_eq!(braze.in_segment(), ids(&["u1"]));
    assert_eq!(braze.profiles.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn subscription_group_membership_is_set_by_e164_phone_numbers() {
    let (braze, url) = start_braze().await;
    let connector = group_by_phone(&url);
    let members = vec![
        member("1", &[("mobile", "+44 7700 900001")]),
        member("2", &[("mobile", "0044 (7700) 900-002")]),
    ];

    let added = connector.deliver(&batch(Change::Add, members)).await;
    let removed = connector
        .deliver(&batch(
            Change::Remove,
            vec![member("2", &[("mobile", "447700900002")])],
        ))
        .await;

    assert_eq!(added, Ok(accepted(&["1", "2"])));
    assert_eq!(removed, Ok(accepted(&["2"])));
    let received = braze.received();
    assert_eq!(received[0].uri, "/v2/subscription/status/set");
    assert_eq!(
        serde_json::from_str::<Value>(&received[0].body).unwrap(),
        json!({"subscription_groups": [{
            "subscription_group_id": GROUP,
            "subscription_state": "subscribed",
            "phones": ["+447700900001", "+447700900002"],
        }]})
    );
    assert_eq!(
        braze.group_states(),
        BTreeMap::from([
            ("u1".to_owned(), "subscribed".to_owned()),
            ("u2".to_owned(), "unsubscribed".to_owned()),
        ])
    );
}

#[tokio::test]
async fn members_without_a_usable_identifier_are_rejected_and_never_sent() {
    let (braze, url) = start_braze().await;
    let members = vec![
        member("1", &[("email", "ann@example.com")]),
        member("2", &[("email", "ann at example")]),
        member("3", &[("external_id", "u3")]),
    ];

    let outcome = by_email(&url).deliver(&batch(Change::Add, members)).await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: vec!["1".into()],
            rejected: vec![
                Rejection {
                    key: "2".into(),
                    reason: "no usable e-mail address: `email` is not an e-mail address".into(),
                },
                Rejection {
                    key: "3".into(),
                    reason: "no usable e-mail address: `email` is missing".into(),
                },
            ],
        })
    );
    let body: Value = serde_json::from_str(&braze.received()[0].body).unwrap();
    assert_eq!(body["attributes"].as_array().unwrap().len(), 1);
    assert_eq!(braze.in_segment(), ids(&["u1"]));
}

#[tokio::test]
async fn a_batch_with_no_usable_member_makes_no_request() {
    let (braze, url) = start_braze().await;

    let outcome = group_by_phone(&url)
        .deliver(&batch(Change::Add, vec![member("1", &[("mobile", "12")])]))
        .await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: vec![],
            rejected: vec![Rejection {
                key: "1".into(),
                reason: "no usable phone number: `mobile` is not a phone number of 7 to 15 \
                         digits with its country code"
                    .into(),
            }],
        })
    );
    assert!(braze.received().is_empty());
}

#[tokio::test]
async fn objects_braze_refuses_in_a_201_are_rejected_and_the_others_applied() {
    let (braze, url) = start_braze().await;
    braze
        .refused
        .lock()
        .unwrap()
        .insert("bob@example.com".into());
    let members = vec![
        member("1", &[("email", "ann@example.com")]),
        member("2", &[("email", "Bob@example.com")]),
        member("3", &[("email", "cat@example.com")]),
    ];

    let outcome = by_email(&url).deliver(&batch(Change::Add, members)).await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: vec!["1".into(), "3".into()],
            rejected: vec![Rejection {
                key: "2".into(),
                reason: "Braze refused the attributes object: <identifier> cannot be updated: \
                         the user is blocklisted"
                    .into(),
            }],
        })
    );
    assert_eq!(braze.in_segment(), ids(&["u1", "u3"]));
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_and_one_without_leaves_the_wait_open() {
    let (braze, url) = start_braze().await;
    braze.fail_next([
        Fault::TooManyRequests {
            retry_after: Some("1"),
            reset_in: None,
        },
        Fault::TooManyRequests {
            retry_after: None,
            reset_in: None,
        },
    ]);
    let started = Instant::now();

    let outcome = deliver_retrying(
        &by_external_id(&url),
        &batch(Change::Add, three_members()),
        2,
    )
    .await;

    let elapsed = started.elapsed();
    assert_eq!(
        outcome,
        Err(DeliveryError::RateLimited {
            message: format!(
                "{url}/users/track answered 429 Too Many Requests: Rate limit exceeded"
            ),
            wait: None,
        })
    );
    assert!(elapsed >= Duration::from_secs(1), "waited only {elapsed:?}");
    assert_eq!(braze.received().len(), 2);
    assert!(braze.in_segment().is_empty());
}

#[tokio::test]
async fn a_429_with_a_rate_limit_reset_waits_until_the_reset_then_lands() {
    let (braze, url) = start_braze().await;
    braze.fail_next([Fault::TooManyRequests {
        retry_after: None,
        reset_in: Some(2),
    }]);
    let connector = by_external_id(&url);

    let direct = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let retried = deliver_retrying(&connector, &batch(Change::Add, three_members()), 3).await;

    let Err(DeliveryError::RateLimited {
        wait: Some(wait), ..
    }) = direct
    else {
        panic!("expected a rate limit with a wait, got {direct:?}");
    };
    // The reset is two whole seconds ahead of the fake's clock, read a moment later.
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(2),
        "{wait:?}"
    );
    assert_eq!(retried, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(braze.in_segment(), ids(&["u1", "u2", "u3"]));
}

#[tokio::test]
async fn a_429_with_a_rate_limit_reset_beyond_any_clock_leaves_the_wait_open_then_lands() {
    let (braze, url) = start_braze().await;
    braze.fail_next([Fault::TooManyRequests {
        retry_after: None,
        reset_in: Some(1 << 63),
    }]);
    let connector = by_external_id(&url);

    let direct = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let retried = deliver_retrying(&connector, &batch(Change::Add, three_members()), 2).await;

    let Err(DeliveryError::RateLimited { wait, .. }) = direct else {
        panic!("expected a rate limit, got {direct:?}");
    };
    assert_eq!(wait, None);
    assert_eq!(retried, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(braze.in_segment(), ids(&["u1", "u2", "u3"]));
}

#[tokio::test]
async fn a_queued_202_counts_as_accepted() {
    let (braze, url) = start_braze().await;
    braze.fail_next([Fault::Queued]);

    let outcome = by_external_id(&url)
        .deliver(&batch(Change::Add, three_members()))
        .await;

    assert_eq!(outcome, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(braze.received()[0].status, 202);
    assert_eq!(braze.in_segment(), ids(&["u1", "u2", "u3"]));
}

#[tokio::test]
async fn server_errors_and_html_pages_are_retried_up_to_max_attempts() {
    let (braze, url) = start_braze().await;
    let connector = by_external_id(&url);

    braze.fail_next([Fault::HtmlPage(502)]);
    let recovered = deliver_retrying(&connector, &batch(Change::Add, three_members()), 3).await;
    braze.fail_next([Fault::Unavailable, Fault::Unavailable, Fault::Unavailable]);
    let exhausted = deliver_retrying(&connector, &batch(Change::Remove, three_members()), 3).await;

    assert_eq!(recovered, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        exhausted,
        Err(DeliveryError::Retryable {
            message: format!(
                "{url}/users/track answered 503 Service Unavailable: Service Unavailable"
            ),
        })
    );
    let statuses: Vec<u16> = braze.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [502, 201, 503, 503, 503]);
    assert_eq!(braze.in_segment(), ids(&["u1", "u2", "u3"]));
}

#[tokio::test]
async fn an_html_page_with_a_client_error_is_permanent() {
    let (braze, url) = start_braze().await;
    braze.fail_next([Fault::HtmlPage(400)]);

    let outcome = deliver_retrying(
        &by_external_id(&url),
        &batch(Change::Add, three_members()),
        3,
    )
    .await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Permanent {
            message: format!(
                "{url}/users/track answered 400 Bad Request with an HTML page instead of a Braze \
                 error"
            ),
        })
    );
    assert_eq!(braze.received().len(), 1);
}

#[tokio::test]
async fn an_answer_slower_than_the_timeout_is_retried_and_the_value_is_held_once() {
    let (braze, url) = start_braze().await;
    braze.fail_next([Fault::Slow(Duration::from_millis(1500))]);
    let connector = by_external_id(&url);

    let direct = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let retried = deliver_retrying(&connector, &batch(Change::Add, three_members()), 3).await;

    let DeliveryError::Retryable { message } = direct.unwrap_err() else {
        panic!("a timeout is retryable");
    };
    assert!(
        message.starts_with(&format!("POST to {url}/users/track timed out")),
        "{message}"
    );
    assert_eq!(retried, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(braze.received().len(), 2);
    assert_eq!(braze.in_segment(), ids(&["u1", "u2", "u3"]));
    assert_eq!(braze.profile("u1").arrays[ATTRIBUTE].len(), 1);
}

#[tokio::test]
async fn a_revoked_key_is_an_auth_failure_sent_once() {
    let (braze, url) = start_braze().await;
    braze.fail_next([Fault::RevokedKey]);

    let outcome = deliver_retrying(
        &by_external_id(&url),
        &batch(Change::Add, three_members()),
        5,
    )
    .await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Auth {
            message: format!(
                "{url}/users/track answered 401 Unauthorized: Invalid API Key; check the REST \
                 API key in `api_key_env`"
            ),
        })
    );
    assert_eq!(braze.received().len(), 1);
    assert!(braze.in_segment().is_empty());
}

#[tokio::test]
async fn a_wrong_key_or_a_missing_permission_is_an_auth_failure() {
    let (braze, url) = start_braze().await;
    let activation = toml::toml! {
        attribute = "segments"
        value = "vip"
    };
    let wrong =
        BrazeConnector::from_settings(&connection(&url), &activation, &secrets("not-the-key"))
            .unwrap();

    let refused = wrong.deliver(&batch(Change::Add, three_members())).await;
    braze.fail_next([Fault::MissingPermission]);
    let forbidden = group_by_phone(&url)
        .deliver(&batch(
            Change::Add,
            vec![member("1", &[("mobile", "+447700900001")])],
        ))
        .await;

    assert!(
        matches!(refused, Err(DeliveryError::Auth { .. })),
        "{refused:?}"
    );
    assert_eq!(
        forbidden,
        Err(DeliveryError::Auth {
            message: format!(
                "{url}/v2/subscription/status/set answered 403 Forbidden: Access denied: the API \
                 key does not have permission for this endpoint; check that the REST API key has \
                 the permission for this endpoint and that the account is active"
            ),
        })
    );
    assert!(braze.in_segment().is_empty());
    assert!(braze.group_states().is_empty());
}

#[tokio::test]
async fn full_batches_fit_the_request_limits_of_each_endpoint() {
    let (braze, url) = start_braze().await;
    let attribute = by_external_id(&url);
    let group = group_by_phone(&url);
    let attribute_members: Vec<Member> = (0..attribute.max_batch_size())
        .map(|n| member(&n.to_string(), &[("external_id", &format!("x{n}"))]))
        .collect();
    let group_members: Vec<Member> = (0..group.max_batch_size())
        .map(|n| member(&n.to_string(), &[("mobile", &format!("+4477009{n:05}"))]))
        .collect();

    let tracked = attribute
        .deliver(&batch(Change::Add, attribute_members))
        .await;
    let subscribed = group.deliver(&batch(Change::Add, group_members)).await;

    assert_eq!(
        (attribute.max_batch_size(), group.max_batch_size()),
        (75, 50)
    );
    assert_eq!(tracked.map(|o| o.accepted.len()), Ok(75));
    assert_eq!(subscribed.map(|o| o.accepted.len()), Ok(50));
    let statuses: Vec<u16> = braze.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [201, 201]);
    assert_eq!(
        braze.group_states(),
        BTreeMap::from([
            ("u1".to_owned(), "subscribed".to_owned()),
            ("u2".to_owned(), "subscribed".to_owned()),
            ("u3".to_owned(), "subscribed".to_owned()),
        ])
    );
}

#[test]
fn braze_settings_report_every_problem_by_key() {
    let connection = toml::toml! {
        api_key_env = "BRAZE_REST_KEY"
        batch_size = 100
        instance = "iad-01"
    };
    let activation = toml::toml! {
        attribute = ""
        subscription_group_id = "abc"
        match_by = "braze_id"
    };

    let errors =
        BrazeConnector::from_settings(&connection, &activation, &BTreeMap::new()).unwrap_err();

    let error = common::problem;
    assert_eq!(
        errors,
        [
            error(
                "instance",
                "unknown key in the connection settings; known keys: api_key_env, base_url, \
                 batch_size, timeout_seconds"
            ),
            error(
                "api_key_env",
                "the environment variable `BRAZE_REST_KEY` is not set; export it with a Braze \
                 REST API key"
            ),
            error(
                "base_url",
                "missing; set it to the REST endpoint of the Braze instance, such as \
                 `https://rest.iad-01.braze.com`"
            ),
            error(
                "batch_size",
                "must be between 1 and 75 in the connection settings, got 100"
            ),
            error(
                "subscription_group_id",
                "only used with `membership = \"subscription_group\"`"
            ),
            error(
                "attribute",
                "empty; set it to the name of the array custom attribute that holds segment \
                 values"
            ),
            error(
                "value",
                "missing; set it to the value that stands for this segment in the array"
            ),
            error(
                "match_by",
                "expected `external_id`, `email` or `phone`, got `braze_id`"
            ),
        ]
    );
}

#[test]
fn a_subscription_group_activation_needs_its_group_id_but_its_connection_checks_alone() {
    let connection = toml::toml! {
        api_key_env = "BRAZE_REST_KEY"
        base_url = "https://rest.fra-01.braze.eu"
    };
    let activation = toml::toml! { membership = "subscription_group" };

    let errors =
        BrazeConnector::from_settings(&connection, &activation, &secrets(KEY)).unwrap_err();
    let alone = segmentd_connectors::check_connection("braze", &connection, &secrets(KEY));

    assert_eq!(
        errors,
        [SettingsError {
            field: "subscription_group_id".into(),
            message: "missing; set it to the id of the subscription group members are subscribed \
                      to"
            .into(),
        }]
    );
    assert_eq!(alone, Ok(()));
}

#[test]
fn braze_batch_size_defaults_to_75_and_subscription_groups_to_50() {
    let connection = toml::toml! {
        api_key_env = "BRAZE_REST_KEY"
        base_url = "https://rest.iad-01.braze.com"
    };
    let attribute = toml::toml! {
        attribute = "segments"
        value = "vip"
    };
    let mut group = toml::toml! { membership = "subscription_group" };
    group.insert("subscription_group_id".into(), GROUP.into());

    let attribute =
        segmentd_connectors::build("braze", &connection, &attribute, &secrets(KEY)).unwrap();
    let group = segmentd_connectors::build("braze", &connection, &group, &secrets(KEY)).unwrap();

    assert_eq!(
        (attribute.kind(), attribute.max_batch_size()),
        ("braze", 75)
    );
    assert_eq!(group.max_batch_size(), 50);
    assert!(segmentd_connectors::KINDS.contains(&"braze"));
}

#[tokio::test]
async fn an_api_key_with_a_trailing_newline_is_refused_at_load_naming_api_key_env() {
    let (braze, url) = start_braze().await;
    let activation = toml::toml! {
        attribute = "segments"
        value = "vip"
    };
    let with_newline = secrets(&format!("{KEY}\n"));

    let built = BrazeConnector::from_settings(&connection(&url), &activation, &with_newline);
    let checked = BrazeConnector::check_connection(&connection(&url), &with_newline);

    let expected = vec![SettingsError {
        field: "api_key_env".into(),
        message: "the API key holds characters an HTTP header cannot carry, such as a trailing \
                  newline; check the environment variable's value"
            .into(),
    }];
    assert_eq!(built.unwrap_err(), expected);
    assert_eq!(checked, Err(expected));
    assert!(braze.received().is_empty());
    assert!(braze.in_segment().is_empty());
}

#[tokio::test]
async fn a_failed_answer_quoting_an_address_and_a_phone_number_is_reported_without_them() {
    let (braze, url) = start_braze().await;
    braze.fail_next([Fault::InvalidContact]);
    let members = vec![
        member("1", &[("email", "ann@example.com")]),
        member("2", &[("email", "bob@example.com")]),
    ];

    let outcome = by_email(&url).deliver(&batch(Change::Add, members)).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Permanent {
            message: format!(
                "{url}/users/track answered 400 Bad Request: Invalid email <member>, contact \
                 support on <number>"
            ),
        })
    );
    assert_eq!(braze.in_segment(), Vec::<String>::new());
}

#[tokio::test]
async fn an_error_that_names_no_member_is_retried_instead_of_accepting_the_batch() {
    let (braze, url) = start_braze().await;
    braze.fail_next([Fault::UnplacedError]);
    let connector = by_external_id(&url);
    let added = batch(Change::Add, three_members());

    let first = connector.deliver(&added).await;
    let retried = deliver_retrying(&connector, &added, 3).await;

    assert_eq!(
        first,
        Err(DeliveryError::Retryable {
            message: format!(
                "{url}/users/track answered 201 Created with 1 error(s) that name no member of \
                 the batch, the first: internal error while processing <address>"
            ),
        })
    );
    assert_eq!(retried, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(braze.in_segment(), ids(&["u1", "u2", "u3"]));
    assert_eq!(braze.received().len(), 2);
}
