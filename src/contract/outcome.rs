//! Every row of the contract's outcome table, and the one place that turns an outcome into the
//! result event's body, properties and headers.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::Serialize;

use super::receipt::Receipt;
use super::wire::*;
use crate::contract::ChatJid;

/// The outcome of one command, one variant per row of the contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Outcome {
    MissingIdempotencyId,
    InstanceNotFound,
    InvalidToken,
    IdempotencyConflict,
    InvalidBody,
    NumberRequired,
    InvalidNumber,
    NotConnected,
    DeleteChatFailed(String),
    DeleteMediaFailed(String),
    Deleted { chat: ChatJid, delete_media: bool },
}

impl Outcome {
    /// The HTTP status the documented API would answer with.
    pub fn status(&self) -> u16 {
        match self {
            Outcome::MissingIdempotencyId
            | Outcome::InvalidBody
            | Outcome::NumberRequired
            | Outcome::InvalidNumber => 400,
            Outcome::InvalidToken => 401,
            Outcome::InstanceNotFound => 404,
            Outcome::IdempotencyConflict => 409,
            Outcome::DeleteChatFailed(_) | Outcome::DeleteMediaFailed(_) => 500,
            Outcome::NotConnected => 503,
            Outcome::Deleted { .. } => 200,
        }
    }

    /// The status as a metric label (no allocation on the hot path).
    pub fn status_label(&self) -> &'static str {
        match self.status() {
            200 => "200",
            400 => "400",
            401 => "401",
            404 => "404",
            409 => "409",
            500 => "500",
            _ => "503",
        }
    }

    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Deleted { .. })
    }

    /// `error.message`, exactly as the contract writes it.
    pub fn error_message(&self) -> Option<String> {
        Some(match self {
            Outcome::MissingIdempotencyId => "Idempotency id is required".into(),
            Outcome::InstanceNotFound => "Instance not found".into(),
            Outcome::InvalidToken => "Invalid token".into(),
            Outcome::IdempotencyConflict => {
                "Idempotency id was already used with a different request".into()
            }
            Outcome::InvalidBody => "Invalid request body".into(),
            Outcome::NumberRequired => "Number is required".into(),
            Outcome::InvalidNumber => "Invalid number".into(),
            Outcome::NotConnected => "Instance is not connected to WhatsApp".into(),
            Outcome::DeleteChatFailed(reason) => format!("Failed to delete chat: {reason}"),
            Outcome::DeleteMediaFailed(reason) => format!("Failed to delete media: {reason}"),
            Outcome::Deleted { .. } => return None,
        })
    }

    /// A bounded label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::MissingIdempotencyId => "missing_idempotency_id",
            Outcome::InstanceNotFound => "instance_not_found",
            Outcome::InvalidToken => "invalid_token",
            Outcome::IdempotencyConflict => "idempotency_conflict",
            Outcome::InvalidBody => "invalid_body",
            Outcome::NumberRequired => "number_required",
            Outcome::InvalidNumber => "invalid_number",
            Outcome::NotConnected => "not_connected",
            Outcome::DeleteChatFailed(_) => "delete_chat_failed",
            Outcome::DeleteMediaFailed(_) => "delete_media_failed",
            Outcome::Deleted { .. } => "deleted",
        }
    }

    pub fn event_type(&self) -> &'static str {
        if self.is_success() {
            SUCCESS_TYPE
        } else {
            FAILURE_TYPE
        }
    }

    /// The routing key on the events exchange.
    pub fn routing_key(&self, instance: &str) -> String {
        format!("{}.{instance}", self.event_type())
    }

    /// The documented response payload, nothing added.
    pub fn body(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Success<'a> {
            success: bool,
            message: &'a str,
            chat_jid: &'a str,
            delete_media: bool,
        }
        #[derive(Serialize)]
        struct Failure {
            success: bool,
            error: ErrorBody,
        }
        #[derive(Serialize)]
        struct ErrorBody {
            message: String,
        }
        let json = match self {
            Outcome::Deleted { chat, delete_media } => serde_json::to_vec(&Success {
                success: true,
                message: if *delete_media {
                    "Chat deleted successfully (including media)"
                } else {
                    "Chat deleted successfully"
                },
                chat_jid: chat.as_str(),
                delete_media: *delete_media,
            }),
            other => serde_json::to_vec(&Failure {
                success: false,
                error: ErrorBody {
                    message: other.error_message().unwrap_or_default(),
                },
            }),
        };
        json.expect("result bodies always serialise")
    }
}

/// What the result event says about the command it answers, besides the outcome.
#[derive(Debug, Clone)]
pub struct EventContext<'a> {
    /// The routing key of the instance (for 404s: whatever the command was sent with).
    pub instance: &'a str,
    /// `None` only for `MissingIdempotencyId`.
    pub idempotency_id: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    /// The chat JID when it is known (the body was valid).
    pub chat: Option<&'a ChatJid>,
    pub attempts: u32,
    pub replayed: bool,
    /// On a 200: what happened.
    pub receipt: Option<&'a Receipt>,
    /// W3C trace context: the worker's span while tracing, else the command's own.
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
    pub app_id: &'a str,
    pub now: chrono::DateTime<chrono::Utc>,
}

/// A result event ready to publish.
#[derive(Debug, Clone)]
pub struct ResultEvent {
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    pub status: u16,
}

/// The one place that builds result events.
pub fn render(outcome: &Outcome, ctx: &EventContext<'_>) -> ResultEvent {
    let event_type = outcome.event_type();
    // A command without an id still gets an event id, so the event is well formed.
    let generated;
    let event_id = match ctx.idempotency_id {
        Some(id) => id,
        None => {
            generated = uuid::Uuid::new_v4().to_string();
            &generated
        }
    };
    let mut headers = FieldTable::default();
    let mut put = |key: &str, value: AMQPValue| {
        headers.insert(ShortString::from(key), value);
    };
    let text = |s: &str| AMQPValue::LongString(s.into());
    put(
        STATUS_HEADER,
        AMQPValue::LongInt(i32::from(outcome.status())),
    );
    put(INSTANCE_HEADER, text(ctx.instance));
    if let Some(id) = ctx.idempotency_id {
        put(IDEMPOTENCY_ID_HEADER, text(id));
    }
    put(
        ATTEMPTS_HEADER,
        AMQPValue::LongInt(ctx.attempts.min(i32::MAX as u32) as i32),
    );
    put(REPLAYED_HEADER, AMQPValue::Boolean(ctx.replayed));
    if let Some(receipt) = ctx.receipt.filter(|_| outcome.is_success()) {
        put(CHAT_KNOWN_HEADER, text(receipt.chat_known.as_str()));
        put(CHAT_KIND_HEADER, text(receipt.chat_kind.as_str()));
        put(DELETED_AT_HEADER, text(&receipt.deleted_at()));
        if let Some(media) = receipt.media {
            let count = |n: u64| AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX));
            put(MEDIA_OBJECTS_DELETED_HEADER, count(media.objects));
            put(MEDIA_BYTES_DELETED_HEADER, count(media.bytes));
        }
    }
    put(CE_SPECVERSION_HEADER, text(CE_SPECVERSION));
    put(CE_ID_HEADER, text(event_id));
    put(
        CE_SOURCE_HEADER,
        text(&format!("/instances/{}", ctx.instance)),
    );
    put(CE_TYPE_HEADER, text(event_type));
    if let Some(chat) = ctx.chat {
        put(CE_SUBJECT_HEADER, text(chat.as_str()));
    }
    put(
        CE_TIME_HEADER,
        text(&ctx.now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
    );
    if let Some(tp) = ctx.traceparent {
        put(TRACEPARENT_HEADER, text(tp));
        if let Some(ts) = ctx.tracestate {
            put(TRACESTATE_HEADER, text(ts));
        }
    }

    let correlation_id = ctx.correlation_id.unwrap_or(event_id);
    let properties = BasicProperties::default()
        .with_message_id(event_id.into())
        .with_correlation_id(correlation_id.into())
        .with_content_type(RESULT_CONTENT_TYPE.into())
        .with_type(event_type.into())
        .with_timestamp(ctx.now.timestamp().max(0) as u64)
        .with_app_id(ctx.app_id.into())
        .with_delivery_mode(2)
        .with_headers(headers);
    ResultEvent {
        routing_key: outcome.routing_key(ctx.instance),
        body: outcome.body(),
        properties,
        status: outcome.status(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::normalise_number;

    #[test]
    fn bodies_are_the_documented_payloads() {
        let chat = normalise_number("5511999999999").unwrap();
        let ok = Outcome::Deleted {
            chat: chat.clone(),
            delete_media: false,
        };
        assert_eq!(
            String::from_utf8(ok.body()).unwrap(),
            r#"{"success":true,"message":"Chat deleted successfully","chat_jid":"5511999999999@s.whatsapp.net","delete_media":false}"#
        );
        let ok = Outcome::Deleted {
            chat,
            delete_media: true,
        };
        assert_eq!(
            String::from_utf8(ok.body()).unwrap(),
            r#"{"success":true,"message":"Chat deleted successfully (including media)","chat_jid":"5511999999999@s.whatsapp.net","delete_media":true}"#
        );
        assert_eq!(
            String::from_utf8(Outcome::NotConnected.body()).unwrap(),
            r#"{"success":false,"error":{"message":"Instance is not connected to WhatsApp"}}"#
        );
        assert_eq!(
            Outcome::DeleteChatFailed("timed out".into())
                .error_message()
                .unwrap(),
            "Failed to delete chat: timed out"
        );
    }

    #[test]
    fn routing_keys_and_types() {
        assert_eq!(
            Outcome::InvalidToken.routing_key("a"),
            "chat.delete_failed.a"
        );
        let chat = normalise_number("5511999999999").unwrap();
        let ok = Outcome::Deleted {
            chat,
            delete_media: false,
        };
        assert_eq!(ok.routing_key("a"), "chat.deleted.a");
        assert_eq!(ok.event_type(), "chat.deleted");
    }
}
