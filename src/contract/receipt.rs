//! What a 200 says happened, besides its documented body: whether the instance's chat list held
//! the chat, what kind of chat it was, when WhatsApp accepted the delete, and what the media
//! purge erased. A data-retention clean-up files it as evidence; it is remembered with the
//! result, so a replay repeats the first answer's values.

use serde::{Deserialize, Serialize};

use crate::contract::{ChatJid, JidServer};

/// Whether the instance's chat list held the chat when it was deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatKnown {
    True,
    False,
    /// The chat list is not synced yet, or a simulated instance not scripted to know.
    Unknown,
}

impl ChatKnown {
    pub fn as_str(self) -> &'static str {
        match self {
            ChatKnown::True => "true",
            ChatKnown::False => "false",
            ChatKnown::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatKind {
    User,
    Group,
}

impl ChatKind {
    pub fn of(chat: &ChatJid) -> Self {
        match chat.server() {
            JidServer::Group => ChatKind::Group,
            JidServer::Phone | JidServer::Lid => ChatKind::User,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ChatKind::User => "user",
            ChatKind::Group => "group",
        }
    }
}

/// A chat delete that happened: the chat deleted (as resolved), whether the chat list held it,
/// and when WhatsApp accepted it (Unix ms). Kept with the idempotency record before a media
/// purge, so a later try that only purges still says what the delete did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deletion {
    pub chat: ChatJid,
    pub known: ChatKnown,
    pub at_ms: i64,
}

/// What a media purge erased.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MediaErased {
    pub objects: u64,
    pub bytes: u64,
}

/// The receipt of a 200.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub chat_known: ChatKnown,
    pub chat_kind: ChatKind,
    /// When WhatsApp accepted the delete (Unix ms).
    pub deleted_at_ms: i64,
    /// With `deleteMedia`: what the purge erased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<MediaErased>,
}

impl Receipt {
    pub fn of(deletion: &Deletion, media: Option<MediaErased>) -> Self {
        Self {
            chat_known: deletion.known,
            chat_kind: ChatKind::of(&deletion.chat),
            deleted_at_ms: deletion.at_ms,
            media,
        }
    }

    /// `deleted_at` as the result carries it (RFC 3339, UTC, milliseconds).
    pub fn deleted_at(&self) -> String {
        chrono::DateTime::from_timestamp_millis(self.deleted_at_ms)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }
}
