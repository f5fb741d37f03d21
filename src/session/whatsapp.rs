//! The real session: a linked device through whatsapp-rust, one SQLite session file per
//! instance. A session that was never paired is opened but not connected (it answers
//! "not connected" until `pair` links it).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use whatsapp_rust::prelude::{Bot, BotHandle, Client, Event, EventKind};
use whatsapp_rust::store::SqliteStore;
use whatsapp_rust::{AppStateError, ErrorChainExt, Jid, message_range};

use crate::command::{ChatJid, JidServer};

use super::{ChatSession, SessionError, SessionState};

pub struct WhatsappSession {
    client: Arc<Client>,
    handle: Mutex<Option<BotHandle>>,
    state: Arc<Mutex<SessionState>>,
    /// One delete in flight per instance: app-state patches are serialised by the crate anyway,
    /// and a queue of them behind a dead socket should not all time out together.
    delete_lock: tokio::sync::Mutex<()>,
    delete_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create the session folder: {0}")]
    Folder(std::io::Error),
    #[error("cannot open the session store: {0}")]
    Store(String),
    #[error("cannot build the WhatsApp client: {0}")]
    Build(String),
}

impl WhatsappSession {
    /// Opens (or creates) the session file; connects only when it holds a paired device.
    pub async fn open(
        instance: &str,
        store_path: &Path,
        delete_timeout: Duration,
    ) -> Result<Self, OpenError> {
        if let Some(dir) = store_path.parent() {
            std::fs::create_dir_all(dir).map_err(OpenError::Folder)?;
        }
        let url = store_path.to_string_lossy();
        let store = SqliteStore::new(&url)
            .await
            .map_err(|e| OpenError::Store(e.to_string()))?;
        let state = Arc::new(Mutex::new(SessionState::Connecting));
        let events_state = state.clone();
        let name = instance.to_owned();
        let bot = Bot::builder()
            .with_backend(store)
            .skip_history_sync()
            .on_event_for(
                &[
                    EventKind::Connected,
                    EventKind::Disconnected,
                    EventKind::LoggedOut,
                    EventKind::StreamReplaced,
                ],
                move |event, _client| {
                    let state = events_state.clone();
                    let name = name.clone();
                    async move { apply_event(&name, &state, &event) }
                },
            )
            .build()
            .await
            .map_err(|e| OpenError::Build(e.to_string()))?;
        let client = bot.client();
        let handle = if client.pn().is_some() {
            Some(bot.spawn())
        } else {
            tracing::warn!(
                instance,
                "WhatsApp instance is not paired; it answers 503 until `chat-delete-worker pair {instance}` links it"
            );
            *state.lock().unwrap_or_else(|e| e.into_inner()) = SessionState::NotPaired;
            None
        };
        Ok(Self {
            client,
            handle: Mutex::new(handle),
            state,
            delete_lock: tokio::sync::Mutex::new(()),
            delete_timeout,
        })
    }

    /// Whether the session file holds a paired device.
    pub fn is_paired(&self) -> bool {
        self.client.pn().is_some()
    }
}

fn apply_event(instance: &str, state: &Mutex<SessionState>, event: &Event) {
    let next = match event {
        Event::Connected(_) => SessionState::Connected,
        Event::Disconnected(_) => SessionState::Connecting,
        Event::LoggedOut(_) | Event::StreamReplaced(_) => {
            tracing::error!(
                instance,
                "WhatsApp logged this device out; pair it again with `chat-delete-worker pair {instance}`"
            );
            SessionState::LoggedOut
        }
        _ => return,
    };
    *state.lock().unwrap_or_else(|e| e.into_inner()) = next;
}

/// The crate's JID for a validated chat, device-free by construction.
fn to_jid(chat: &ChatJid) -> Jid {
    let user = chat.user().to_owned();
    match chat.server() {
        JidServer::Phone => Jid::pn(user),
        JidServer::Lid => Jid::lid(user),
        JidServer::Group => Jid::group(user),
    }
}

/// Maps the crate's errors onto ours with its own classification helpers.
fn classify(err: &AppStateError) -> SessionError {
    if let AppStateError::InvalidRequest(text) = err {
        // Never paired, or paired but the phone has not shared its app-state keys yet.
        return if text.contains("no app state sync key") {
            SessionError::NotConnected
        } else {
            SessionError::Rejected(short(text))
        };
    }
    if err.is_transport_unavailable() {
        return SessionError::NotConnected;
    }
    if err.is_timeout() {
        return SessionError::Timeout;
    }
    if let Some(rejection) = err.server_rejection() {
        let code = rejection.code;
        return if code >= 500 || code == 429 || rejection.backoff.is_some() {
            SessionError::Server(format!("WhatsApp server error {code}"))
        } else {
            SessionError::Rejected(format!("rejected by WhatsApp ({code})"))
        };
    }
    let text = err.to_string();
    if text.contains("rejected") {
        SessionError::Rejected(short(&text))
    } else {
        SessionError::Server(short(&text))
    }
}

fn short(text: &str) -> String {
    text.chars().take(160).collect()
}

#[async_trait::async_trait]
impl ChatSession for WhatsappSession {
    fn state(&self) -> SessionState {
        let state = *self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state == SessionState::Connected
            && !(self.client.is_connected() && self.client.is_logged_in())
        {
            return SessionState::Connecting;
        }
        state
    }

    async fn delete_chat(&self, chat: &ChatJid, delete_media: bool) -> Result<(), SessionError> {
        let _one_at_a_time = self.delete_lock.lock().await;
        let jid = to_jid(chat);
        // "now" as the last message time, as WhatsApp Web and whatsmeow send when no better is known.
        let range = message_range(chrono::Utc::now().timestamp(), None, vec![]);
        let actions = self.client.chat_actions();
        let call = actions.delete_chat(&jid, delete_media, Some(range));
        match tokio::time::timeout(self.delete_timeout, call).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(classify(&err)),
            Err(_) => Err(SessionError::Timeout),
        }
    }

    async fn shutdown(&self) {
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            handle.shutdown().await;
        }
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = SessionState::Stopped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::normalise_number;

    #[test]
    fn validated_chats_map_to_device_free_crate_jids() {
        for (input, server) in [
            ("5511999999999", whatsapp_rust::Server::Pn),
            ("123456789012345@lid", whatsapp_rust::Server::Lid),
            ("120363024567890123@g.us", whatsapp_rust::Server::Group),
        ] {
            let chat = normalise_number(input).unwrap();
            let jid = to_jid(&chat);
            assert_eq!(jid.to_string(), chat.as_str());
            assert_eq!(jid.server, server);
            assert_eq!(jid.device, 0);
        }
    }

    #[tokio::test]
    async fn a_never_paired_session_is_not_connected_and_answers_not_connected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions").join("fresh.db");
        let session = WhatsappSession::open("fresh", &path, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(path.exists(), "the session store is created");
        assert!(!session.is_paired());
        assert_eq!(session.state(), SessionState::NotPaired);
        let chat = normalise_number("5511999999999").unwrap();
        assert_eq!(
            session.delete_chat(&chat, false).await,
            Err(SessionError::NotConnected)
        );
        session.shutdown().await;
        // Reopening the same file reads the same (unpaired) device back.
        let again = WhatsappSession::open("fresh", &path, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!again.is_paired());
    }
}
