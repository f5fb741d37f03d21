//! Every name on the wire: exchanges and queues, the headers and fixed property values of
//! commands and results, and the event types. The worker, the command-line tools and the tests
//! read them from here, so changing one is a one-file edit.

use lapin::types::{AMQPValue, FieldTable, ShortString};

// ---- commands (what publishers send) ----

/// The command's TokenAccount or TokenInstance, a string.
pub const TOKEN_HEADER: &str = "token";
/// W3C trace context; carried over to the result event when well formed.
pub const TRACEPARENT_HEADER: &str = "traceparent";
pub const TRACESTATE_HEADER: &str = "tracestate";
/// What the worker's own copies (retried, parked) carry instead of the token (hex).
pub const TOKEN_PROOF_HEADER: &str = "x-chat-delete-token-proof";

// ---- our own headers on retried and parked copies of a command ----

/// How many times the work was already tried (set by the retry path).
pub const ATTEMPTS_SO_FAR_HEADER: &str = "x-chat-delete-attempts";
/// How many delayed redeliveries the command has had.
pub const RETRIES_HEADER: &str = "x-chat-delete-retries";
/// A parked command's final status and outcome label, and the instance it was for.
pub const PARKED_STATUS_HEADER: &str = "x-parked-status";
pub const PARKED_OUTCOME_HEADER: &str = "x-parked-outcome";
pub const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-original-routing-key";
/// A marker in the parking stream: the entry at this offset was replayed.
pub const PARKED_REPLAYED_HEADER: &str = "x-parked-replayed";
/// The offset RabbitMQ puts on every message read from a stream.
pub const STREAM_OFFSET_HEADER: &str = "x-stream-offset";
/// Headers RabbitMQ adds when it dead-letters a message (`x-death`, `x-first-death-*`, ...).
pub const DEATH_HEADER_PREFIXES: [&str; 3] = ["x-death", "x-first-death", "x-last-death"];

/// True for names the contract allows as instance names (1 to 64 letters, digits, `-` or
/// `_`, starting with a letter or digit): they become queue names, routing keys, metric labels
/// and media paths.
pub fn is_valid_instance_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=64).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
}

// ---- result events ----

/// Result headers (the HTTP status and metadata travel here).
pub const STATUS_HEADER: &str = "status";
pub const INSTANCE_HEADER: &str = "instance";
pub const IDEMPOTENCY_ID_HEADER: &str = "idempotency_id";
pub const ATTEMPTS_HEADER: &str = "attempts";
pub const REPLAYED_HEADER: &str = "replayed";
/// On a 200, what happened (the receipt; a replay repeats the first answer's).
pub const CHAT_KNOWN_HEADER: &str = "chat_known";
pub const CHAT_KIND_HEADER: &str = "chat_kind";
pub const DELETED_AT_HEADER: &str = "deleted_at";
pub const MEDIA_OBJECTS_DELETED_HEADER: &str = "media_objects_deleted";
pub const MEDIA_BYTES_DELETED_HEADER: &str = "media_bytes_deleted";
/// CloudEvents attributes in binary mode.
pub const CE_SPECVERSION_HEADER: &str = "cloudEvents_specversion";
pub const CE_ID_HEADER: &str = "cloudEvents_id";
pub const CE_SOURCE_HEADER: &str = "cloudEvents_source";
pub const CE_TYPE_HEADER: &str = "cloudEvents_type";
pub const CE_SUBJECT_HEADER: &str = "cloudEvents_subject";
pub const CE_TIME_HEADER: &str = "cloudEvents_time";
pub const CE_SPECVERSION: &str = "1.0";
/// `content_type` of every result.
pub const RESULT_CONTENT_TYPE: &str = "application/json";
/// Event `type` of a success; also the routing-key prefix on the events exchange. Fixed by the
/// contract, whatever the namespace.
pub const SUCCESS_TYPE: &str = "chat.deleted";
/// Event `type` of every error outcome.
pub const FAILURE_TYPE: &str = "chat.delete_failed";
/// The `instance` of a 404 answer whose routing key is not a valid instance name (it cannot be
/// one: names start with a letter or digit).
pub const UNNAMED_INSTANCE: &str = "_invalid";

/// Every exchange and queue name, derived from one namespace so tests and tenants can share a
/// broker without touching each other.
#[derive(Debug, Clone)]
pub struct Names {
    namespace: String,
}

impl Names {
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
        }
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// Direct exchange; routing key = instance name.
    pub fn commands_exchange(&self) -> String {
        format!("{}.commands", self.namespace)
    }
    /// Fanout alternate exchange of the commands exchange.
    pub fn unrouted_exchange(&self) -> String {
        format!("{}.commands.unrouted", self.namespace)
    }
    /// Commands no instance queue took: answered with 404.
    pub fn unrouted_queue(&self) -> String {
        format!("{}.delete.unrouted", self.namespace)
    }
    pub fn instance_queue(&self, instance: &str) -> String {
        format!("{}.delete.{instance}", self.namespace)
    }
    /// The parking stream: commands whose retries ran out, and crash-loopers.
    pub fn parked_queue(&self) -> String {
        format!("{}.delete.parked", self.namespace)
    }
    /// Fanout exchange the command queues dead-letter to (a command over the delivery limit).
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.namespace)
    }
    /// Where dead-lettered commands wait for a worker to answer and park them.
    pub fn dead_queue(&self) -> String {
        format!("{}.delete.dead", self.namespace)
    }
    /// Fanout exchange in front of one retry tier; routing keys pass through untouched, so the
    /// dead-lettered message comes back with its instance routing key.
    pub fn retry_exchange(&self, delay_ms: u64) -> String {
        format!("{}.retry.{}", self.namespace, tier_label(delay_ms))
    }
    pub fn retry_queue(&self, delay_ms: u64) -> String {
        format!("{}.delete.retry.{}", self.namespace, tier_label(delay_ms))
    }
    /// Topic exchange of result events.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }
    /// A bulk batch's durable results queue (`publish` / `results`).
    pub fn results_queue(&self, batch: &str) -> String {
        format!("{}.results.{batch}", self.namespace)
    }
}

fn tier_label(delay_ms: u64) -> String {
    if delay_ms.is_multiple_of(60_000) {
        format!("{}m", delay_ms / 60_000)
    } else if delay_ms.is_multiple_of(1_000) {
        format!("{}s", delay_ms / 1_000)
    } else {
        format!("{delay_ms}ms")
    }
}

/// A header's value when it is a string (long or short), as bytes.
pub fn string_header(headers: &FieldTable, key: &str) -> Option<Vec<u8>> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.as_bytes().to_vec()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes().to_vec()),
        _ => None,
    }
}

/// A header's value as text, when it is a string.
pub fn text_header(headers: &FieldTable, key: &str) -> Option<String> {
    string_header(headers, key).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// A header's value when it is a non-negative integer of any AMQP width.
pub fn int_header(headers: &FieldTable, key: &str) -> Option<u32> {
    let value = match headers.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::LongLongInt(v) => *v,
        _ => return None,
    };
    u32::try_from(value).ok()
}

/// A header's value when it is a boolean `true`.
pub fn is_true_header(headers: &FieldTable, key: &str) -> bool {
    matches!(headers.inner().get(key), Some(AMQPValue::Boolean(true)))
}

/// A copy of `headers` with `set` applied.
pub fn with_headers(headers: Option<&FieldTable>, set: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut headers = headers.cloned().unwrap_or_default();
    for (key, value) in set {
        headers.insert(ShortString::from(key), value);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_namespace_gives_the_documented_names() {
        let n = Names::new("chat");
        assert_eq!(n.commands_exchange(), "chat.commands");
        assert_eq!(n.events_exchange(), "chat.events");
        assert_eq!(n.unrouted_exchange(), "chat.commands.unrouted");
        assert_eq!(n.unrouted_queue(), "chat.delete.unrouted");
        assert_eq!(n.instance_queue("demo"), "chat.delete.demo");
        assert_eq!(n.parked_queue(), "chat.delete.parked");
        assert_eq!(n.retry_queue(5_000), "chat.delete.retry.5s");
        assert_eq!(n.retry_queue(120_000), "chat.delete.retry.2m");
        assert_eq!(n.retry_exchange(250), "chat.retry.250ms");
        assert_eq!(n.results_queue("june"), "chat.results.june");
        assert_eq!(n.dead_exchange(), "chat.dead");
        assert_eq!(n.dead_queue(), "chat.delete.dead");
    }

    #[test]
    fn integer_headers_of_any_width_and_nothing_else() {
        let mut h = FieldTable::default();
        h.insert("a".into(), AMQPValue::ShortShortUInt(7));
        h.insert("b".into(), AMQPValue::LongLongInt(9));
        h.insert("c".into(), AMQPValue::LongInt(-1));
        h.insert("d".into(), AMQPValue::LongString("5".into()));
        assert_eq!(int_header(&h, "a"), Some(7));
        assert_eq!(int_header(&h, "b"), Some(9));
        assert_eq!(int_header(&h, "c"), None);
        assert_eq!(int_header(&h, "d"), None);
        assert_eq!(text_header(&h, "d").as_deref(), Some("5"));
    }
}
