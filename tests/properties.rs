//! Property tests of the decoder and the number normaliser: no input panics, every input lands
//! on exactly one contract row, and a normalised JID is always safe to put in a path.

use chat_delete_worker::contract::Outcome;
use chat_delete_worker::contract::{normalise_number, parse_body};
use proptest::prelude::*;

const MAX: usize = 64 * 1024;

fn assert_safe_jid(jid: &str) {
    assert!(
        !jid.contains('/') && !jid.contains('\\') && !jid.contains(".."),
        "{jid}"
    );
    assert!(
        !jid.contains('\0') && !jid.chars().any(char::is_whitespace),
        "{jid}"
    );
    let (user, server) = jid.split_once('@').expect("one @");
    assert!(["s.whatsapp.net", "lid", "g.us"].contains(&server), "{jid}");
    assert!(
        !user.is_empty() && user.bytes().all(|b| b.is_ascii_digit() || b == b'-'),
        "{jid}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_bytes_map_to_one_body_row(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        match parse_body(&body, MAX) {
            Ok(req) => assert_safe_jid(req.chat.as_str()),
            Err(outcome) => prop_assert!(matches!(
                outcome,
                Outcome::InvalidBody | Outcome::NumberRequired | Outcome::InvalidNumber
            )),
        }
    }

    #[test]
    fn any_string_number_is_valid_json_so_never_invalid_body(
        number in any::<String>(),
        media in proptest::option::of(any::<bool>()),
    ) {
        let body = serde_json::json!({"number": number, "deleteMedia": media});
        let result = parse_body(body.to_string().as_bytes(), MAX);
        match result {
            Ok(req) => {
                assert_safe_jid(req.chat.as_str());
                prop_assert_eq!(req.delete_media, media.unwrap_or(false));
            }
            Err(Outcome::NumberRequired) => prop_assert!(number.trim().is_empty()),
            Err(outcome) => prop_assert_eq!(outcome, Outcome::InvalidNumber),
        }
    }

    #[test]
    fn jid_like_strings_never_escape(
        user in "[0-9a-z./\\\\:_ -]{0,24}",
        server in prop_oneof![
            Just("s.whatsapp.net".to_string()), Just("lid".to_string()), Just("g.us".to_string()),
            Just("S.WHATSAPP.NET".to_string()), "[a-z./]{0,12}",
        ],
    ) {
        if let Some(jid) = normalise_number(&format!("{user}@{server}")) {
            assert_safe_jid(jid.as_str());
        }
    }

    #[test]
    fn formatted_phone_numbers_normalise_to_their_digits(
        digits in "[1-9][0-9]{6,14}",
        plus in any::<bool>(),
        seps in proptest::collection::vec(prop_oneof![Just(""), Just(" "), Just("-")], 15),
    ) {
        let mut text = String::from(if plus { "+" } else { "" });
        for (i, c) in digits.chars().enumerate() {
            if i > 0 { text.push_str(seps[i % seps.len()]); }
            text.push(c);
        }
        let jid = normalise_number(&text).expect("a formatted phone number is valid");
        prop_assert_eq!(jid.as_str(), format!("{digits}@s.whatsapp.net"));
    }
}
