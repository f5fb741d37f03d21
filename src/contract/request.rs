//! The command body: strict JSON decoding, in the contract's order of checks.

use serde::Deserialize;

use super::chat::{ChatJid, normalise_number};
use super::outcome::Outcome;

/// What a valid body asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteRequest {
    pub chat: ChatJid,
    /// Resolve the chat to the key the phone holds it under (a number or a user JID alike);
    /// false only where a tool deletes a JID as given.
    pub lookup: bool,
    pub delete_media: bool,
}

#[derive(Deserialize)]
struct RawBody {
    // A wrong type (`"number": 5511...`) fails here, as a Go/serde-strict handler would.
    #[serde(default)]
    number: Option<String>,
    #[serde(default, rename = "deleteMedia")]
    delete_media: Option<bool>,
}

/// Decodes and validates a body, in the contract's order: `Invalid request body`, then
/// `Number is required`, then `Invalid number`.
pub fn parse_body(body: &[u8], max_bytes: usize) -> Result<DeleteRequest, Outcome> {
    // Derived structs also accept JSON arrays; the body must be an object.
    let is_object = body.trim_ascii_start().first() == Some(&b'{');
    if !is_object || body.len() > max_bytes {
        return Err(Outcome::InvalidBody);
    }
    let raw: RawBody = serde_json::from_slice(body).map_err(|_| Outcome::InvalidBody)?;
    let number = raw.number.unwrap_or_default();
    let number = number.trim();
    if number.is_empty() {
        return Err(Outcome::NumberRequired);
    }
    let chat = normalise_number(number).ok_or(Outcome::InvalidNumber)?;
    Ok(DeleteRequest {
        chat,
        // Every user chat is resolved, a JID as well as a number (see the session's resolver).
        lookup: true,
        delete_media: raw.delete_media.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_rules_in_contract_order() {
        let max = 64 * 1024;
        let ok = parse_body(br#"{"number":"5511999999999"}"#, max).unwrap();
        assert!(!ok.delete_media);
        let ok = parse_body(
            br#"{"number":"5511999999999","deleteMedia":true,"extra":[1]}"#,
            max,
        )
        .unwrap();
        assert!(ok.delete_media);
        for (body, want) in [
            (&b""[..], Outcome::InvalidBody),
            (b"not json", Outcome::InvalidBody),
            (b"[]", Outcome::InvalidBody),
            (b"\"5511\"", Outcome::InvalidBody),
            (br#"{"number":5511999999999}"#, Outcome::InvalidBody),
            (
                br#"{"number":"5511999999999","deleteMedia":"yes"}"#,
                Outcome::InvalidBody,
            ),
            (br#"{"number":"5511999999999"} x"#, Outcome::InvalidBody),
            (b"{}", Outcome::NumberRequired),
            (br#"{"number":null}"#, Outcome::NumberRequired),
            (br#"{"number":"   "}"#, Outcome::NumberRequired),
            (br#"{"number":"abc"}"#, Outcome::InvalidNumber),
        ] {
            assert_eq!(parse_body(body, max).unwrap_err(), want, "{body:?}");
        }
        let big = format!(
            r#"{{"number":"5511999999999","pad":"{}"}}"#,
            "x".repeat(100)
        );
        assert_eq!(
            parse_body(big.as_bytes(), 64).unwrap_err(),
            Outcome::InvalidBody
        );
    }
}
