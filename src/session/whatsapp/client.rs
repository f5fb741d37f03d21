//! Everything about one whatsapp-rust client that is not the actor: opening the session file
//! (with its lock), building the client, reading its state from events, deleting a chat, and
//! the CLI's inspect and unpair.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use whatsapp_rust::pair_code::PairCodeOptions;
use whatsapp_rust::prelude::{Bot, Client, Event, EventKind};
use whatsapp_rust::store::SqliteStore;
use whatsapp_rust::transport::TokioWebSocketTransportFactory;
use whatsapp_rust::{AppStateError, ErrorChainExt, Jid, message_range};

use super::Device;
use crate::pipeline::request::{ChatJid, JidServer};
use crate::session::{SessionError, SessionOptions, SessionState};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create the session folder: {0}")]
    Folder(std::io::Error),
    #[error("session file {0} is in use by another process (a running worker or `pair`)")]
    Busy(PathBuf),
    #[error("cannot open the session store: {0}")]
    Store(String),
    #[error("cannot build the WhatsApp client: {0}")]
    Build(String),
}

/// An exclusive hold on a session file, released on drop (and by the OS if we die).
pub struct SessionLock(#[allow(dead_code)] File);

impl SessionLock {
    pub fn acquire(store_path: &Path) -> Result<Self, OpenError> {
        if let Some(dir) = store_path.parent() {
            std::fs::create_dir_all(dir).map_err(OpenError::Folder)?;
        }
        let mut lock_path = store_path.as_os_str().to_owned();
        lock_path.push(".lock");
        let file = File::create(PathBuf::from(lock_path)).map_err(OpenError::Folder)?;
        match file.try_lock() {
            Ok(()) => Ok(Self(file)),
            Err(_) => Err(OpenError::Busy(store_path.to_owned())),
        }
    }
}

/// Builds (but does not start) a client over the session file. `on_event` receives the
/// connection and pairing events.
pub async fn build_bot(
    options: &SessionOptions,
    extra_events: &[EventKind],
    pair_phone: Option<&str>,
    on_event: impl Fn(Arc<Event>) + Send + Sync + 'static,
) -> Result<Bot, OpenError> {
    let url = options.store_path.to_string_lossy();
    let store = SqliteStore::new(&url)
        .await
        .map_err(|e| OpenError::Store(e.to_string()))?;
    let mut kinds = vec![
        EventKind::Connected,
        EventKind::Disconnected,
        EventKind::LoggedOut,
        EventKind::StreamReplaced,
        EventKind::TemporaryBan,
        EventKind::PairSuccess,
    ];
    kinds.extend_from_slice(extra_events);
    let on_event = Arc::new(on_event);
    let mut builder = Bot::builder()
        .with_backend(store)
        .skip_history_sync()
        .on_event_for(&kinds, move |event, _client| {
            on_event(event);
            async {}
        });
    if let Some(phone) = pair_phone {
        builder = builder.with_pair_code(PairCodeOptions {
            phone_number: phone.to_owned(),
            ..Default::default()
        });
    }
    if let Some(url) = &options.transport_url {
        builder = builder
            .with_transport_factory(TokioWebSocketTransportFactory::new().with_url(url.clone()))
            .with_version((2, 3000, 0));
    }
    builder
        .build()
        .await
        .map_err(|e| OpenError::Build(e.to_string()))
}

/// The number a client is linked to, `+<digits>`.
pub fn paired_as(client: &Client) -> Option<String> {
    client.pn().map(|jid| format!("+{}", jid.user))
}

/// The state an event moves a session to, if any.
pub fn next_state(event: &Event) -> Option<SessionState> {
    Some(match event {
        Event::Connected(_) => SessionState::Connected,
        Event::Disconnected(_) | Event::PairSuccess(_) => SessionState::Connecting,
        Event::LoggedOut(_) => SessionState::LoggedOut,
        Event::StreamReplaced(_) => SessionState::Replaced,
        Event::TemporaryBan(_) => SessionState::Banned,
        _ => return None,
    })
}

/// The one line an operator needs when an instance is parked.
pub(super) fn operator_hint(instance: &str, state: SessionState) -> Option<String> {
    Some(match state {
        SessionState::LoggedOut => format!(
            "WhatsApp logged instance {instance} out; it answers 503 until it is linked again: `chat-delete-worker unpair {instance}`, then `chat-delete-worker pair {instance}`, then reload the worker (SIGHUP)"
        ),
        SessionState::Replaced => format!(
            "Another client took over instance {instance}'s session (stream replaced); make sure only one worker hosts it, then reload the worker (SIGHUP)"
        ),
        SessionState::Banned => format!(
            "WhatsApp temporarily banned instance {instance}; it answers 503 until the ban ends and the worker is reloaded (SIGHUP)"
        ),
        _ => return None,
    })
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

/// The crate's client is the real device: a delete is the app-state action `deleteChat`,
/// within our own timeout.
#[async_trait::async_trait]
impl Device for Client {
    async fn delete_chat(
        &self,
        chat: &ChatJid,
        delete_media: bool,
        timeout: Duration,
    ) -> Result<(), SessionError> {
        let jid = to_jid(chat);
        // "now" as the last message time, as WhatsApp Web and whatsmeow send when no better
        // is known.
        let range = message_range(Utc::now().timestamp(), None, vec![]);
        let actions = self.chat_actions();
        let call = actions.delete_chat(&jid, delete_media, Some(range));
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(classify(&err)),
            Err(_) => Err(SessionError::Timeout),
        }
    }
}

/// The session file's own view, for CLI commands run beside (not inside) the worker.
pub async fn inspect(options: &SessionOptions) -> Result<Option<String>, OpenError> {
    if !options.store_path.exists() {
        return Ok(None);
    }
    let _lock = SessionLock::acquire(&options.store_path)?;
    let bot = build_bot(options, &[], None, |_| {}).await?;
    Ok(paired_as(&bot.client()))
}

/// Unlinks the device (best effort: WhatsApp is told when it can be reached) and removes the
/// session file.
pub async fn unpair(options: &SessionOptions) -> Result<bool, OpenError> {
    if !options.store_path.exists() {
        return Ok(false);
    }
    let lock = SessionLock::acquire(&options.store_path)?;
    let bot = build_bot(options, &[], None, |_| {}).await?;
    let client = bot.client();
    if client.pn().is_some() {
        let handle = bot.spawn();
        if client
            .wait_for_connected(Duration::from_secs(15))
            .await
            .is_ok()
        {
            client.logout().await;
        } else {
            tracing::warn!(
                "WhatsApp not reachable: the device stays in the phone's Linked Devices list until removed there."
            );
        }
        // Dropping the handle when the deadline passes aborts the client.
        let _ = tokio::time::timeout(options.shutdown_deadline, handle.shutdown()).await;
    } else {
        drop(bot);
    }
    drop(client);
    for suffix in ["", "-wal", "-shm"] {
        let mut path = options.store_path.as_os_str().to_owned();
        path.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(path));
    }
    drop(lock);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::request::normalise_number;

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

    #[test]
    fn errors_are_classified() {
        let no_key = AppStateError::InvalidRequest("no app state sync key available".into());
        assert_eq!(classify(&no_key), SessionError::NotConnected);
        let bad = AppStateError::InvalidRequest("mute in the past".into());
        assert!(matches!(classify(&bad), SessionError::Rejected(_)));
        let rejected = AppStateError::Internal(anyhow::anyhow!("patch rejected by server"));
        assert!(matches!(classify(&rejected), SessionError::Rejected(_)));
        let other = AppStateError::Internal(anyhow::anyhow!("socket hiccup"));
        assert_eq!(
            classify(&other),
            SessionError::Server("socket hiccup".into())
        );
    }
}
