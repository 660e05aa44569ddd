//! Identifier normalisation and hashing shared by the connectors.
//!
//! This module owns the rules that turn a raw identifier value (as stored in the master
//! segment) into the exact text a platform matches on, and the SHA-256 digest of that text.
//! Every normaliser is a pure function that returns the normalised text or says, without
//! quoting the value, why nothing usable is left; the same function serves adds and removes,
//! so a removal reproduces the identifiers of the add it undoes.
//!
//! Which rules a platform applies, and whether it wants the digest or the clear text, is the
//! connector's business; the rules here follow Meta's customer-file normalisation, which the
//! other advertising platforms share for e-mail addresses. Rules this module does not apply:
//! Gmail-specific dot and `+tag` removal (Google only), and mapping spelled-out US state
//! names or month names to codes.

use sha2::{Digest, Sha256};

/// Why a raw value gives no usable identifier. Never carries the value itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// The member has no value for the identifier.
    #[error("is missing")]
    Missing,
    /// Nothing is left once the value is normalised (blank, or only punctuation).
    #[error("is empty once normalised")]
    Empty,
    /// The value does not have the shape the identifier needs.
    #[error("is not {expected}")]
    Malformed {
        /// What the value should look like, e.g. `an e-mail address`.
        expected: &'static str,
    },
}

/// The lower-case hexadecimal SHA-256 digest of `text`'s UTF-8 bytes.
pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// True when `text` already is a SHA-256 digest: exactly 64 hexadecimal digits.
///
/// Upper-case digits are accepted here; [`hash_normalised`] lower-cases them rather than
/// hashing the digest a second time.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|byte| byte.is_ascii_hexdigit())
}

/// The digest a platform matches on for `raw`: `raw` itself (lower-cased) when it already is
/// a SHA-256 digest, otherwise the digest of `normalise(raw)`.
pub fn hash_normalised(
    raw: &str,
    normalise: impl FnOnce(&str) -> Result<String, Invalid>,
) -> Result<String, Invalid> {
    let trimmed = raw.trim();
    if is_sha256_hex(trimmed) {
        return Ok(trimmed.to_ascii_lowercase());
    }
    normalise(raw).map(|text| sha256_hex(&text))
}

/// An e-mail address trimmed and lower-cased. It must hold one `@` with text on both sides
/// and no whitespace.
pub fn email(raw: &str) -> Result<String, Invalid> {
    let text = raw.trim().to_lowercase();
    if text.is_empty() {
        return Err(Invalid::Empty);
    }
    let shaped = match text.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && !text.chars().any(char::is_whitespace)
        }
        None => false,
    };
    if shaped {
        Ok(text)
    } else {
        Err(Invalid::Malformed {
            expected: "an e-mail address",
        })
    }
}

/// A phone number as digits only, leading zeros removed (so an international `00` prefix
/// goes too), country code included and no `+`: `+1 (650) 555-1212` becomes `16505551212`.
///
/// The country code cannot be added here: a national number without one is kept as its
/// digits and will not match. Between 7 and 15 digits must remain (the E.164 range).
pub fn phone_digits(raw: &str) -> Result<String, Invalid> {
    let digits: String = raw.chars().filter(char::is_ascii_digit).collect();
    let digits = digits.trim_start_matches('0');
    match digits.len() {
        0 => Err(Invalid::Empty),
        7..=15 => Ok(digits.to_owned()),
        _ => Err(Invalid::Malformed {
            expected: "a phone number of 7 to 15 digits with its country code",
        }),
    }
}

/// A phone number in E.164 form: `+` and the digits of [`phone_digits`]
/// (`+1 (650) 555-1212` becomes `+16505551212`).
pub fn phone_e164(raw: &str) -> Result<String, Invalid> {
    phone_digits(raw).map(|digits| format!("+{digits}"))
}

/// A first or last name, a city or a region: lower-cased letters only, in any script, so
/// punctuation, spaces and digits go (`Mary-Ann O'Neil` becomes `maryannoneil`).
pub fn letters(raw: &str) -> Result<String, Invalid> {
    let text: String = raw
        .chars()
        .filter(|c| c.is_alphabetic())
        .flat_map(char::to_lowercase)
        .collect();
    if text.is_empty() {
        Err(Invalid::Empty)
    } else {
        Ok(text)
    }
}

/// The first letter of a first name, lower-cased.
pub fn first_initial(raw: &str) -> Result<String, Invalid> {
    letters(raw).map(|name| name.chars().take(1).collect())
}

/// An ISO 3166-1 alpha-2 country code, lower-cased (`US` becomes `us`).
pub fn country(raw: &str) -> Result<String, Invalid> {
    let text = raw.trim().to_ascii_lowercase();
    if text.is_empty() {
        Err(Invalid::Empty)
    } else if text.len() == 2 && text.bytes().all(|byte| byte.is_ascii_lowercase()) {
        Ok(text)
    } else {
        Err(Invalid::Malformed {
            expected: "a two-letter ISO 3166 country code",
        })
    }
}

/// A postal code, lower-cased without spaces. A US ZIP+4 (`94025-1234`) keeps its first five
/// digits; so does any code when `country` is `us`, which must then start with five digits.
pub fn zip(raw: &str, country: Option<&str>) -> Result<String, Invalid> {
    let text: String = raw
        .chars()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_lowercase)
        .collect();
    if text.is_empty() {
        return Err(Invalid::Empty);
    }
    let starts_with_five_digits =
        text.len() >= 5 && text.bytes().take(5).all(|byte| byte.is_ascii_digit());
    let zip_plus_four = text.len() == 10
        && starts_with_five_digits
        && text.as_bytes()[5] == b'-'
        && text.bytes().skip(6).all(|byte| byte.is_ascii_digit());
    let in_us = country.is_some_and(|country| country.trim().eq_ignore_ascii_case("us"));
    if zip_plus_four || (in_us && starts_with_five_digits) {
        Ok(text[..5].to_owned())
    } else if in_us {
        Err(Invalid::Malformed {
            expected: "a US ZIP code of five digits",
        })
    } else {
        Ok(text)
    }
}

/// A gender as `m` or `f`, from `m`, `f`, `male` or `female` in any case.
pub fn gender(raw: &str) -> Result<String, Invalid> {
    match raw.trim().to_lowercase().as_str() {
        "" => Err(Invalid::Empty),
        "m" | "male" => Ok("m".to_owned()),
        "f" | "female" => Ok("f".to_owned()),
        _ => Err(Invalid::Malformed {
            expected: "`m`, `f`, `male` or `female`",
        }),
    }
}

/// A birth year as four digits (`1987`).
pub fn birth_year(raw: &str) -> Result<String, Invalid> {
    let text = raw.trim();
    if text.is_empty() {
        Err(Invalid::Empty)
    } else if text.len() == 4 && text.bytes().all(|byte| byte.is_ascii_digit()) {
        Ok(text.to_owned())
    } else {
        Err(Invalid::Malformed {
            expected: "a four-digit year",
        })
    }
}

/// A birth month as two digits, `01` to `12` (`3` becomes `03`).
pub fn birth_month(raw: &str) -> Result<String, Invalid> {
    two_digits(raw, 12, "a month number from 1 to 12")
}

/// A birth day of the month as two digits, `01` to `31`.
pub fn birth_day(raw: &str) -> Result<String, Invalid> {
    two_digits(raw, 31, "a day of the month from 1 to 31")
}

/// A number from 1 to `max` written with two digits.
fn two_digits(raw: &str, max: u8, expected: &'static str) -> Result<String, Invalid> {
    let text = raw.trim();
    if text.is_empty() {
        return Err(Invalid::Empty);
    }
    match text.parse::<u8>() {
        Ok(number) if (1..=max).contains(&number) && text.len() <= 2 => Ok(format!("{number:02}")),
        _ => Err(Invalid::Malformed { expected }),
    }
}

/// A value sent in clear text (external IDs, mobile advertising IDs): trimmed, otherwise
/// unchanged.
pub fn clear(raw: &str) -> Result<String, Invalid> {
    let text = raw.trim();
    if text.is_empty() {
        Err(Invalid::Empty)
    } else {
        Ok(text.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Digests computed outside this code with `printf '%s' <text> | sha256sum`.
    const SHA256_TEST_AT_EXAMPLE_COM: &str =
        "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b";
    const SHA256_16505551212: &str =
        "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176";
    const SHA256_JOHN: &str = "96d9632f363564cc3032521409cf22a852f2032eec099ed5967c0d000cec607a";
    const SHA256_US: &str = "79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621";
    const SHA256_94025: &str = "b9a9cf3cd3723a2e91b7c23ecf68456e872b6e5d86e5cab7f3d45a7302da32c7";

    #[test]
    fn sha256_is_lower_case_hex_of_the_utf8_bytes() {
        assert_eq!(sha256_hex("test@example.com"), SHA256_TEST_AT_EXAMPLE_COM);
        assert_eq!(sha256_hex("16505551212"), SHA256_16505551212);
        assert_eq!(sha256_hex("john"), SHA256_JOHN);
        assert_eq!(sha256_hex("us"), SHA256_US);
        assert_eq!(sha256_hex("94025"), SHA256_94025);
    }

    #[test]
    fn an_email_is_trimmed_and_lower_cased_before_hashing() {
        let hashed = hash_normalised("  Test@Example.COM \n", email);

        assert_eq!(hashed, Ok(SHA256_TEST_AT_EXAMPLE_COM.to_owned()));
    }

    #[test]
    fn a_value_that_already_is_a_digest_is_not_hashed_again() {
        let upper = SHA256_TEST_AT_EXAMPLE_COM.to_ascii_uppercase();

        assert_eq!(
            hash_normalised(SHA256_TEST_AT_EXAMPLE_COM, email),
            Ok(SHA256_TEST_AT_EXAMPLE_COM.to_owned())
        );
        assert_eq!(
            hash_normalised(&format!(" {upper} "), email),
            Ok(SHA256_TEST_AT_EXAMPLE_COM.to_owned())
        );
    }

    #[test]
    fn sixty_three_or_non_hex_characters_are_not_taken_for_a_digest() {
        assert!(!is_sha256_hex(&SHA256_TEST_AT_EXAMPLE_COM[1..]));
        assert!(!is_sha256_hex(&format!(
            "g{}",
            &SHA256_TEST_AT_EXAMPLE_COM[1..]
        )));
        assert!(is_sha256_hex(SHA256_TEST_AT_EXAMPLE_COM));
    }

    #[test]
    fn an_empty_value_is_never_hashed() {
        assert_eq!(hash_normalised("   ", email), Err(Invalid::Empty));
        assert_eq!(hash_normalised("", phone_digits), Err(Invalid::Empty));
        assert_eq!(hash_normalised(" - ", letters), Err(Invalid::Empty));
    }

    #[test]
    fn emails_without_one_at_sign_between_text_are_malformed() {
        let malformed = Err(Invalid::Malformed {
            expected: "an e-mail address",
        });

        assert_eq!(email("test.example.com"), malformed);
        assert_eq!(email("@example.com"), malformed);
        assert_eq!(email("test@"), malformed);
        assert_eq!(email("a@b@example.com"), malformed);
        assert_eq!(email("te st@example.com"), malformed);
    }

    #[test]
    fn phones_keep_digits_without_plus_or_leading_zeros() {
        assert_eq!(phone_digits("+1 (650) 555-1212"), Ok("16505551212".into()));
        assert_eq!(phone_digits("001-650-555-1212"), Ok("16505551212".into()));
        assert_eq!(
            hash_normalised("+1 650 555 1212", phone_digits),
            Ok(SHA256_16505551212.into())
        );
    }

    #[test]
    fn phones_outside_seven_to_fifteen_digits_are_malformed() {
        let malformed = Err(Invalid::Malformed {
            expected: "a phone number of 7 to 15 digits with its country code",
        });

        assert_eq!(phone_digits("555-12"), malformed);
        assert_eq!(phone_digits("1234567890123456"), malformed);
        assert_eq!(phone_digits("call me"), Err(Invalid::Empty));
    }

    #[test]
    fn names_keep_lower_case_letters_of_any_script() {
        assert_eq!(letters(" John "), Ok("john".into()));
        assert_eq!(letters("Mary-Ann O'Neil"), Ok("maryannoneil".into()));
        assert_eq!(letters("Ærøskøbing"), Ok("ærøskøbing".into()));
        assert_eq!(letters("Дмитрий"), Ok("дмитрий".into()));
        assert_eq!(first_initial("  Émile"), Ok("é".into()));
    }

    #[test]
    fn countries_are_two_lower_case_letters() {
        assert_eq!(country(" US "), Ok("us".into()));
        assert_eq!(
            country("USA"),
            Err(Invalid::Malformed {
                expected: "a two-letter ISO 3166 country code"
            })
        );
        assert_eq!(hash_normalised("US", country), Ok(SHA256_US.into()));
    }

    #[test]
    fn zips_lose_spaces_and_us_zips_keep_five_digits() {
        assert_eq!(zip("94025-1234", None), Ok("94025".into()));
        assert_eq!(zip("94025 1234", Some("US")), Ok("94025".into()));
        assert_eq!(zip("SW1A 1AA", Some("gb")), Ok("sw1a1aa".into()));
        assert_eq!(zip("75008", Some("fr")), Ok("75008".into()));
        assert_eq!(
            zip("SW1A", Some("us")),
            Err(Invalid::Malformed {
                expected: "a US ZIP code of five digits"
            })
        );
        assert_eq!(
            hash_normalised("94025-1234", |raw| zip(raw, None)),
            Ok(SHA256_94025.into())
        );
    }

    #[test]
    fn genders_and_birth_dates_take_their_short_forms() {
        assert_eq!(gender("Female"), Ok("f".into()));
        assert_eq!(gender(" M "), Ok("m".into()));
        assert_eq!(birth_year("1987"), Ok("1987".into()));
        assert_eq!(birth_month("3"), Ok("03".into()));
        assert_eq!(birth_day("31"), Ok("31".into()));
        assert_eq!(
            birth_month("13"),
            Err(Invalid::Malformed {
                expected: "a month number from 1 to 12"
            })
        );
        assert_eq!(
            birth_day("003"),
            Err(Invalid::Malformed {
                expected: "a day of the month from 1 to 31"
            })
        );
    }
}
