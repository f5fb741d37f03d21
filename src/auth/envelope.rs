//! The first pipeline stage: what a delivery says, read from its properties and headers.

use lapin::BasicProperties;

use super::TokenProof;
use crate::contract::wire::{
    ATTEMPTS_SO_FAR_HEADER, RETRIES_HEADER, TOKEN_HEADER, TOKEN_PROOF_HEADER, TRACEPARENT_HEADER,
    TRACESTATE_HEADER, int_header, string_header,
};

/// A command's envelope; the body is validated later, after authentication.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    /// AMQP `message_id`; empty is treated as absent.
    pub idempotency_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// The `token` header, only when it is a string.
    pub token: Option<Vec<u8>>,
    /// The proof a retried or parked copy carries instead of the token.
    pub token_proof: Option<TokenProof>,
    /// Tries already made before this delivery (0 for a fresh command).
    pub previous_attempts: u32,
    /// Delayed redeliveries so far.
    pub retries: u32,
    pub traceparent: Option<String>,
    /// Vendor trace state beside a valid `traceparent` (W3C: at most 512 printable characters).
    pub tracestate: Option<String>,
}

impl Envelope {
    pub fn from_properties(props: &BasicProperties) -> Self {
        let non_empty = |s: Option<&lapin::types::ShortString>| {
            s.map(|s| s.as_str().to_owned()).filter(|s| !s.is_empty())
        };
        let headers = props.headers().as_ref();
        let traceparent = headers
            .and_then(|h| string_header(h, TRACEPARENT_HEADER))
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|tp| is_traceparent(tp));
        // Trace state means nothing without the parent it belongs to.
        let tracestate = headers
            .filter(|_| traceparent.is_some())
            .and_then(|h| string_header(h, TRACESTATE_HEADER))
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|ts| is_tracestate(ts));
        Self {
            idempotency_id: non_empty(props.message_id().as_ref()),
            correlation_id: non_empty(props.correlation_id().as_ref()),
            reply_to: non_empty(props.reply_to().as_ref()),
            token: headers.and_then(|h| string_header(h, TOKEN_HEADER)),
            token_proof: headers
                .and_then(|h| string_header(h, TOKEN_PROOF_HEADER))
                .and_then(|proof| TokenProof::from_hex(&proof)),
            previous_attempts: headers
                .and_then(|h| int_header(h, ATTEMPTS_SO_FAR_HEADER))
                .unwrap_or(0),
            retries: headers
                .and_then(|h| int_header(h, RETRIES_HEADER))
                .unwrap_or(0),
            traceparent,
            tracestate,
        }
    }
}

/// Printable ASCII, at most 512 characters (W3C trace context); anything else is dropped.
fn is_tracestate(ts: &str) -> bool {
    !ts.is_empty() && ts.len() <= 512 && ts.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// `00-<32 hex>-<16 hex>-<2 hex>`; anything else is dropped rather than echoed.
fn is_traceparent(tp: &str) -> bool {
    let parts: Vec<&str> = tp.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable, ShortString};

    #[test]
    fn reads_ids_token_and_attempts() {
        let mut h = FieldTable::default();
        h.insert(
            ShortString::from("token"),
            AMQPValue::LongString("t".into()),
        );
        h.insert(
            ShortString::from(ATTEMPTS_SO_FAR_HEADER),
            AMQPValue::LongInt(3),
        );
        h.insert(
            ShortString::from("traceparent"),
            AMQPValue::LongString("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        );
        let props = BasicProperties::default()
            .with_message_id("id-1".into())
            .with_correlation_id("".into())
            .with_headers(h);
        let env = Envelope::from_properties(&props);
        assert_eq!(env.idempotency_id.as_deref(), Some("id-1"));
        assert_eq!(env.correlation_id, None);
        assert_eq!(env.token.as_deref(), Some(&b"t"[..]));
        assert_eq!(env.previous_attempts, 3);
        assert!(env.traceparent.is_some());
    }

    #[test]
    fn a_token_that_is_not_a_string_is_no_token() {
        let mut h = FieldTable::default();
        h.insert(ShortString::from("token"), AMQPValue::LongInt(5));
        h.insert(
            ShortString::from("traceparent"),
            AMQPValue::LongString("junk".into()),
        );
        let env = Envelope::from_properties(&BasicProperties::default().with_headers(h));
        assert_eq!(env.token, None);
        assert_eq!(env.traceparent, None);
        assert_eq!(env.idempotency_id, None);
    }

    #[test]
    fn trace_state_is_kept_only_beside_a_valid_parent_and_when_well_formed() {
        let envelope = |parent: &str, state: &str| {
            let mut h = FieldTable::default();
            let text = |s: &str| AMQPValue::LongString(s.into());
            h.insert(ShortString::from(TRACEPARENT_HEADER), text(parent));
            h.insert(ShortString::from(TRACESTATE_HEADER), text(state));
            Envelope::from_properties(&BasicProperties::default().with_headers(h)).tracestate
        };
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(envelope(parent, "k=v,a=b").as_deref(), Some("k=v,a=b"));
        assert_eq!(envelope("junk", "k=v"), None);
        assert_eq!(envelope(parent, "k=v\n"), None);
        assert_eq!(envelope(parent, &"k=v,".repeat(200)), None);
    }
}
