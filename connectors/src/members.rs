//! The members of a batch a connector can send, and those it rejects before sending.
//!
//! Every platform connector first turns each member's identifiers into what its platform
//! takes, and rejects the members that have nothing usable without sending them. This module
//! owns that split ([`prepare`]) and, for the platforms that take members by e-mail address,
//! the reading of that address ([`addressed`], [`distinct_addresses`]). What a usable
//! identifier is, is each connector's business.

use std::collections::BTreeSet;

use crate::identifiers::{self, Invalid};
use crate::{Batch, Member, Outcome, Rejection};

/// The members of `batch` that `prepare` makes ready to send, in order, and an outcome
/// rejecting each of the others with the reason `prepare` gave.
///
/// When any is rejected, their count is logged at DEBUG as members without a usable `what`
/// (`identifier`, `e-mail address`) not sent to `platform`.
pub(crate) fn prepare<'a, T>(
    batch: &'a Batch,
    platform: &str,
    what: &str,
    mut prepare: impl FnMut(&'a Member) -> Result<T, String>,
) -> (Vec<T>, Outcome) {
    let mut members = Vec::with_capacity(batch.members.len());
    let mut outcome = Outcome::default();
    for member in &batch.members {
        match prepare(member) {
            Ok(prepared) => members.push(prepared),
            Err(reason) => outcome.rejected.push(Rejection {
                key: member.key.clone(),
                reason,
            }),
        }
    }
    if !outcome.rejected.is_empty() {
        tracing::debug!(
            activation = %batch.activation,
            change = batch.change.as_str(),
            sequence = batch.sequence,
            rejected = outcome.rejected.len(),
            "members without a usable {what} are not sent to {platform}"
        );
    }
    (members, outcome)
}

/// A member ready to send by its e-mail address.
pub(crate) struct Addressed<'a> {
    /// The member's profile key.
    pub(crate) key: &'a str,
    /// The trimmed, lower-cased address.
    pub(crate) email: String,
}

/// `member` with the address its identifier `identifier` holds, trimmed and lower-cased; the
/// reason to reject it when it has no usable address.
pub(crate) fn addressed<'a>(member: &'a Member, identifier: &str) -> Result<Addressed<'a>, String> {
    let email = match member.identifiers.get(identifier) {
        Some(raw) => identifiers::email(raw),
        None => Err(Invalid::Missing),
    };
    match email {
        Ok(email) => Ok(Addressed {
            key: &member.key,
            email,
        }),
        Err(invalid) => Err(format!(
            "no usable e-mail address: `{identifier}` {invalid}"
        )),
    }
}

/// The addresses of `members`, each once, in order.
pub(crate) fn distinct_addresses<'m>(members: &'m [Addressed<'_>]) -> Vec<&'m str> {
    let mut seen = BTreeSet::new();
    members
        .iter()
        .map(|member| member.email.as_str())
        .filter(|email| seen.insert(*email))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::Change;

    fn member(key: &str, email: Option<&str>) -> Member {
        Member {
            key: key.into(),
            identifiers: email
                .map(|email| BTreeMap::from([("mail".to_owned(), email.to_owned())]))
                .unwrap_or_default(),
        }
    }

    #[test]
    fn members_without_a_usable_address_are_rejected_and_the_others_kept_in_order() {
        let batch = Batch {
            run_id: 1,
            activation: "vip/list".into(),
            change: Change::Add,
            sequence: 0,
            members: vec![
                member("1", Some(" Ann@Example.com ")),
                member("2", None),
                member("3", Some("not an address")),
                member("4", Some("ann@example.com")),
            ],
            replace: None,
        };

        let (kept, outcome) = prepare(&batch, "a platform", "e-mail address", |member| {
            addressed(member, "mail")
        });

        let keys: Vec<&str> = kept.iter().map(|member| member.key).collect();
        assert_eq!(keys, ["1", "4"]);
        assert_eq!(distinct_addresses(&kept), ["ann@example.com"]);
        assert_eq!(
            outcome.rejected,
            [
                Rejection {
                    key: "2".into(),
                    reason: "no usable e-mail address: `mail` is missing".into(),
                },
                Rejection {
                    key: "3".into(),
                    reason: "no usable e-mail address: `mail` is not an e-mail address".into(),
                },
            ]
        );
        assert!(outcome.accepted.is_empty());
    }
}
