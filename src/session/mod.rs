//! The `ChatSession` boundary: one WhatsApp connection per instance, real or simulated.

pub mod migrate;
pub mod postgres;
mod simulated;
pub mod whatsapp;

pub use simulated::SimulatedSession;
pub use whatsapp::WhatsappSession;

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};

use std::sync::Arc;

use crate::contract::ChatJid;
use crate::contract::ChatKnown;
use crate::fence::Lease;
use crate::fence::{Fence, Fenced};

/// What an instance's session looks like from outside.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SessionStatus {
    pub state: SessionState,
    /// The phone number the device is linked to, once paired.
    pub paired_as: Option<String>,
    pub changed_at: DateTime<Utc>,
    /// Until when WhatsApp's 429 holds this instance's deletes back.
    pub throttled_until: Option<DateTime<Utc>>,
    /// When the chat list's app state (`regular_high`, where deletes go) last failed to sync,
    /// since the session was opened: deletes built on it may not land.
    pub app_state_failed_at: Option<DateTime<Utc>>,
    /// Since when the chat list's app state is stuck at version 0 (the client cannot sync it).
    pub app_state_stuck_since: Option<DateTime<Utc>>,
    /// The chat index, for sessions that keep one.
    pub chat_index: Option<ChatIndexStatus>,
}

/// How much of the phone's chat list an instance's chat index holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatIndexStatus {
    pub chats: usize,
    /// The phone's whole chat list arrived (history sync at pairing).
    pub synced: bool,
    /// Chats were dropped to stay within `worker.chat_index_max_chats`.
    pub overflowed: bool,
}

/// A delete WhatsApp took: the chat deleted (as resolved) and whether the instance's chat
/// list held it (what a 200 reports as `chat_known`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    pub chat: ChatJid,
    pub known: ChatKnown,
}

/// Where one instance's session is kept.
#[derive(Debug, Clone)]
pub enum SessionStore {
    /// A SQLite file, held with a file lock (one host).
    Sqlite(PathBuf),
    /// Rows in PostgreSQL, each opening fencing the earlier ones (any host).
    Postgres {
        sessions: postgres::PgSessions,
        instance: String,
    },
}

impl std::fmt::Display for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionStore::Sqlite(path) => write!(f, "{}", path.display()),
            SessionStore::Postgres { instance, .. } => {
                write!(f, "the PostgreSQL session store (instance {instance})")
            }
        }
    }
}

/// How to reach one session.
#[derive(Clone)]
pub struct SessionOptions {
    pub store: SessionStore,
    /// The worker's lease on the instance: a session opens only while it holds (a shared one
    /// records its generation). `None` for the CLI, which takes the session over as it is.
    pub owner: Option<Arc<Lease>>,
    /// Our bound on one delete (the crate's own IQ timeout is 75 s).
    pub delete_timeout: Duration,
    /// Time given to a client to flush and disconnect before it is aborted.
    pub shutdown_deadline: Duration,
    /// Another WhatsApp endpoint (a mock server in tests); `None` for the real one.
    pub transport_url: Option<String>,
    /// Cache and budget of number lookups.
    pub lookup: whatsapp::LookupLimits,
    /// Most chats an instance's chat index keeps.
    pub chat_index_max: usize,
}

impl SessionOptions {
    /// A configured instance's session settings; `database` is the shared session store when
    /// the config selects one.
    pub fn of(
        config: &crate::config::Config,
        instance: &str,
        database: Option<&postgres::PgSessions>,
    ) -> Self {
        let worker = &config.worker;
        let store = match database {
            Some(sessions) => SessionStore::Postgres {
                sessions: sessions.clone(),
                instance: instance.to_owned(),
            },
            None => SessionStore::Sqlite(config.session_store_path(instance)),
        };
        Self {
            store,
            owner: None,
            delete_timeout: Duration::from_millis(worker.delete_timeout_ms),
            shutdown_deadline: Duration::from_millis(worker.shutdown_grace_ms),
            transport_url: config
                .instances
                .get(instance)
                .and_then(|cfg| cfg.transport_url.clone()),
            lookup: whatsapp::LookupLimits {
                cache_ttl: Duration::from_secs(worker.lookup_cache_ttl_s),
                per_minute: worker.lookups_per_minute,
            },
            chat_index_max: worker.chat_index_max_chats,
        }
    }
}

/// Why a delete did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// No active, logged-in session, or the app-state keys have not arrived yet.
    #[error("instance is not connected")]
    NotConnected,
    /// No answer in time; the delete may or may not have been applied (a second one is harmless).
    #[error("timed out")]
    Timeout,
    /// WhatsApp had trouble (5xx, throttling, transport); worth another try.
    #[error("{0}")]
    Server(String),
    /// WhatsApp refused the request; another try would be refused too.
    #[error("{0}")]
    Rejected(String),
    /// The fence refused the delete just before it would have been sent: nothing was done.
    #[error("{0}")]
    Fenced(Fenced),
}

impl SessionError {
    pub fn is_retryable(&self) -> bool {
        !matches!(self, SessionError::Rejected(_) | SessionError::Fenced(_))
    }

    /// Short and free of secrets: it becomes `Failed to delete chat: <reason>`.
    pub fn reason(&self) -> String {
        let text = self.to_string();
        text.chars().take(200).collect()
    }
}

/// Connection state of an instance, as the pipeline and the health endpoint see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Never paired: run `chat-delete-worker pair <instance>`.
    NotPaired,
    Connecting,
    Connected,
    /// WhatsApp unlinked the device: parked until it is paired again.
    LoggedOut,
    /// Temporarily banned by WhatsApp: parked.
    Banned,
    /// Another client took the session over: parked.
    Replaced,
    Stopped,
}

impl SessionState {
    pub const ALL: [SessionState; 7] = [
        SessionState::NotPaired,
        SessionState::Connecting,
        SessionState::Connected,
        SessionState::LoggedOut,
        SessionState::Banned,
        SessionState::Replaced,
        SessionState::Stopped,
    ];

    pub fn label(self) -> &'static str {
        match self {
            SessionState::NotPaired => "not_paired",
            SessionState::Connecting => "connecting",
            SessionState::Connected => "connected",
            SessionState::LoggedOut => "logged_out",
            SessionState::Banned => "banned",
            SessionState::Replaced => "replaced",
            SessionState::Stopped => "stopped",
        }
    }
}

/// How opening a session went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// Open, or nothing a second try would change (never paired; the lease is gone).
    Done,
    /// The session's store could not be reached or held: worth trying again.
    Failed,
}

#[async_trait::async_trait]
pub trait ChatSession: Send + Sync {
    fn state(&self) -> SessionState;

    /// Deletes the chat from the instance's chat list (all linked devices, through app state),
    /// if `fence` still holds just before the delete is sent (it may wait for the session).
    /// With `lookup`, a phone number is first resolved to the chat the phone holds; returns
    /// the JID deleted and whether the chat list held it. The phone's own media is never
    /// touched. `seen_ms` (Unix ms) is when the command was first seen: the delete covers what
    /// the chat held then, and never more on a later try.
    async fn delete_chat_as_of(
        &self,
        chat: &ChatJid,
        lookup: bool,
        seen_ms: u64,
        fence: Arc<dyn Fence>,
    ) -> Result<Deleted, SessionError>;

    /// [`Self::delete_chat_as_of`] now (tools and tests; commands carry their own time).
    async fn delete_chat(
        &self,
        chat: &ChatJid,
        lookup: bool,
        fence: Arc<dyn Fence>,
    ) -> Result<ChatJid, SessionError> {
        let now = chrono::Utc::now().timestamp_millis().max(0) as u64;
        let deleted = self.delete_chat_as_of(chat, lookup, now, fence).await;
        deleted.map(|deleted| deleted.chat)
    }

    /// Picks up a session paired since the start (or since it was parked).
    async fn reload(&self) {}

    /// Opens the session: this worker just took the instance over.
    async fn open(&self) -> Opening {
        Opening::Done
    }

    /// Closes the session (flushing what it keeps) without stopping for good: this worker
    /// hands the instance over, and may take it again later.
    async fn close(&self) {}

    /// Stops the session, flushing what it must keep.
    async fn shutdown(&self) {}

    /// Paired number and last change, for sessions that have them.
    fn details(&self) -> Option<SessionStatus> {
        None
    }
}
