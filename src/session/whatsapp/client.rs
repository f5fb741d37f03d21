//! Everything about one whatsapp-rust client that is not the actor: holding the session (a
//! file lock, or a fenced opening in PostgreSQL), building the client, reading its state from
//! events, deleting a chat, and the CLI's inspect and unpair.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use whatsapp_rust::pair_code::PairCodeOptions;
use whatsapp_rust::prelude::{Bot, Client, Event, EventKind};
use whatsapp_rust::store::SqliteStore;
use whatsapp_rust::sync_task::MajorSyncTask;
use whatsapp_rust::transport::TokioWebSocketTransportFactory;
use whatsapp_rust::wacore::appstate::patch_decode::WAPatchName;
use whatsapp_rust::{AppStateError, ContactError, ErrorChainExt, Jid};

use super::Device;
use super::gated::{GatedBackend, SendGate};
use super::mutation::Mutation;
use super::resolve::{Account, Directory};
use crate::fence::Fenced;
use crate::session::postgres::{PgSessionError, PgStore};
use crate::session::{SessionError, SessionOptions, SessionState, SessionStore};
use whatsapp_rust::wacore::store::traits::{Backend, DeviceStore};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create the session folder: {0}")]
    Folder(std::io::Error),
    #[error("session file {0} is in use by another process (a running worker or `pair`)")]
    Busy(PathBuf),
    #[error("{0}")]
    Database(PgSessionError),
    #[error("this worker no longer owns the instance")]
    NotOwner,
    #[error("cannot open the session store: {0}")]
    Store(String),
    #[error("cannot build the WhatsApp client: {0}")]
    Build(String),
}

impl From<PgSessionError> for OpenError {
    fn from(e: PgSessionError) -> Self {
        OpenError::Database(e)
    }
}

/// An exclusive hold on a session: a file lock (released on drop, and by the OS if we die), or
/// an opening of the shared store (which refuses every earlier opener's writes).
pub enum SessionHold {
    File { _lock: SessionLock, path: PathBuf },
    Database(PgStore),
}

impl SessionHold {
    /// Takes the session: as the owner's lease generation when there is an owner.
    pub async fn acquire(options: &SessionOptions) -> Result<Self, OpenError> {
        let generation = match &options.owner {
            Some(lease) => Some(lease.generation().ok_or(OpenError::NotOwner)?),
            None => None,
        };
        match &options.store {
            SessionStore::Sqlite(path) => Ok(Self::File {
                _lock: SessionLock::acquire(path)?,
                path: path.clone(),
            }),
            SessionStore::Postgres { sessions, instance } => {
                let store = sessions.open(instance, generation).await?;
                // The open may have waited on the database: a lease that ended meanwhile must
                // not go on to connect (connecting knocks out the instance's new owner).
                match &options.owner {
                    Some(lease) if lease.generation() != generation => Err(OpenError::NotOwner),
                    _ => Ok(Self::Database(store)),
                }
            }
        }
    }
}

/// An exclusive hold on a session file.
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

/// Builds (but does not start) a client over the held session. `on_event` receives the
/// connection and pairing events.
pub async fn build_bot(
    options: &SessionOptions,
    hold: &SessionHold,
    extra_events: &[EventKind],
    pair_phone: Option<&str>,
    on_event: impl Fn(Arc<Event>) + Send + Sync + 'static,
) -> Result<Bot, OpenError> {
    let store = backend(hold).await?;
    build_on(options, store, extra_events, pair_phone, on_event).await
}

/// As [`build_bot`] for the worker's own client: its store behind `gate`, so that no patch
/// goes out after the deadline of the send that asked for it.
pub async fn build_gated_bot(
    options: &SessionOptions,
    hold: &SessionHold,
    gate: Arc<SendGate>,
    on_event: impl Fn(Arc<Event>) + Send + Sync + 'static,
) -> Result<Bot, OpenError> {
    let store: Arc<dyn Backend> = Arc::new(GatedBackend::new(backend(hold).await?, gate));
    build_on(options, store, WATCHED, None, on_event).await
}

async fn backend(hold: &SessionHold) -> Result<Arc<dyn Backend>, OpenError> {
    Ok(match hold {
        SessionHold::Database(store) => Arc::new(store.clone()),
        SessionHold::File { path, .. } => Arc::new(
            SqliteStore::new(&path.to_string_lossy())
                .await
                .map_err(|e| OpenError::Store(e.to_string()))?,
        ),
    })
}

async fn build_on(
    options: &SessionOptions,
    store: Arc<dyn Backend>,
    extra_events: &[EventKind],
    pair_phone: Option<&str>,
    on_event: impl Fn(Arc<Event>) + Send + Sync + 'static,
) -> Result<Bot, OpenError> {
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
    let mut builder = Bot::builder().with_backend_arc(store);
    // History sync (the phone's chat list) is only fetched by a client that reads it.
    if !kinds.contains(&EventKind::HistorySync) {
        builder = builder.skip_history_sync();
    }
    let builder = builder.on_event_for(&kinds, move |event, _client| {
        on_event(event);
        async {}
    });
    let mut builder = builder;
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
    client.pn().as_ref().map(number)
}

fn number(jid: &Jid) -> String {
    format!("+{}", jid.user)
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

/// The events the worker's client must deliver besides the state changes: a 429 comes as
/// either of the first two (`throttle`), a chat list that did not sync as the third; the
/// rest feed the chat index (`chats`).
pub(super) const WATCHED: &[EventKind] = &[
    EventKind::StreamError,
    EventKind::ConnectFailure,
    EventKind::AppStateSyncFailed,
    EventKind::Messages,
    EventKind::HistorySync,
    EventKind::PinUpdate,
    EventKind::DeleteChatUpdate,
];

/// `fatal` or `retryable` when the event says the chat list's collection (`regular_high`,
/// where deletes go) did not sync.
pub fn chat_list_sync_failed(event: &Event) -> Option<&'static str> {
    let Event::AppStateSyncFailed(failed) = event else {
        return None;
    };
    let names = |list: &[String]| list.iter().any(|c| c == "regular_high");
    if names(&failed.fatal) {
        Some("fatal")
    } else if names(&failed.retryable) {
        Some("retryable")
    } else {
        None
    }
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

/// Whether the session can build a delete on what the phone holds: it has an app-state key
/// and has synced the collection deletes go to (`regular_high`) at least once.
pub async fn app_state_ready(client: &Client) -> bool {
    let (has_key, version) = chat_list_version(client).await;
    has_key && version > 0
}

/// Whether the session holds an app-state key, and the chat list's version (0: never synced).
async fn chat_list_version(client: &Client) -> (bool, u64) {
    let backend = client.persistence_manager().backend();
    let has_key = matches!(backend.get_latest_sync_key_id().await, Ok(Some(_)));
    let version = match backend.get_version("regular_high").await {
        Ok(state) => state.version,
        Err(_) => 0,
    };
    (has_key, version)
}

/// Maps the crate's errors onto ours with its own classification helpers. The one case it
/// offers no type for is the server's verdict on a patch, which it reports as text: only a
/// fatal verdict (400/404) is final; a retryable one, a conflict that outlasted the crate's own
/// attempts, and anything unknown are worth another try.
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
    if text.contains("rejected: fatal error") {
        SessionError::Rejected(short(&text))
    } else {
        SessionError::Server(short(&text))
    }
}

/// A failed lookup never makes a delete final: the number may be fine once WhatsApp answers.
fn classify_lookup(err: &ContactError) -> SessionError {
    if err.is_transport_unavailable() {
        SessionError::NotConnected
    } else if err.is_timeout() {
        SessionError::Timeout
    } else {
        SessionError::Server("could not look the number up on WhatsApp".into())
    }
}

fn short(text: &str) -> String {
    text.chars().take(160).collect()
}

/// The real device: the crate's client, and the gate in front of its store.
pub struct Linked {
    client: Arc<Client>,
    gate: Arc<SendGate>,
    /// The crate call still running from an earlier send or catch-up. Calls run to their end
    /// on a task of their own: a timeout answers the command but never cancels the crate
    /// between the writes of a patch (its version, the old MACs, the new ones); the next call
    /// waits for it.
    running: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Linked {
    pub fn new(client: Arc<Client>, gate: Arc<SendGate>) -> Self {
        Self {
            client,
            gate,
            running: Default::default(),
        }
    }

    /// Runs `call` on its own task after the previous one ended; `None` when either did not
    /// end within `timeout` (the call goes on).
    async fn run<T: Send + 'static>(
        &self,
        timeout: Duration,
        call: impl Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut running = self.running.lock().await;
        if let Some(mut previous) = running.take()
            && tokio::time::timeout_at(deadline, &mut previous)
                .await
                .is_err()
        {
            *running = Some(previous);
            return None;
        }
        let (done, answer) = tokio::sync::oneshot::channel();
        *running = Some(tokio::spawn(async move {
            let _ = done.send(call.await);
        }));
        drop(running);
        tokio::time::timeout_at(deadline, answer).await.ok()?.ok()
    }
}

/// A delete is the app-state action `deleteChat`, within our own timeout.
#[async_trait::async_trait]
impl Device for Linked {
    async fn send(
        &self,
        mutation: &Mutation,
        timeout: Duration,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), SessionError> {
        let (client, gate) = (self.client.clone(), self.gate.clone());
        let args: Vec<String> = mutation
            .index_args()
            .into_iter()
            .map(str::to_owned)
            .collect();
        let (schema, value) = (mutation.schema(), mutation.value.clone());
        let call = async move {
            gate.arm(deadline);
            let index: Vec<&str> = args.iter().map(String::as_str).collect();
            let sent = client.send_app_state_action(schema, &index, &value).await;
            gate.disarm();
            sent
        };
        match self.run(timeout, call).await {
            None => Err(SessionError::Timeout),
            Some(Ok(())) => Ok(()),
            Some(Err(_)) if self.gate.held_back() => Err(SessionError::Fenced(Fenced(
                "the fence ended before the delete could be sent",
            ))),
            Some(Err(err)) => Err(classify(&err)),
        }
    }

    async fn catch_up(&self, timeout: Duration) {
        let task = MajorSyncTask::AppStateSync {
            name: WAPatchName::RegularHigh,
            full_sync: false,
        };
        let client = self.client.clone();
        // Best effort: a delete on a stale base is still applied after a conflict.
        let _ = self
            .run(timeout, async move {
                let _ = client.process_sync_task(task).await;
            })
            .await;
    }

    async fn chat_list_stuck(&self) -> bool {
        let (has_key, version) = chat_list_version(&self.client).await;
        has_key && version == 0
    }
}

#[async_trait::async_trait]
impl Directory for Linked {
    async fn known_lid(&self, phone: &str) -> Option<String> {
        self.client.known_lid(phone).await
    }

    async fn known_phone(&self, lid: &str) -> Option<String> {
        self.client.known_phone(lid).await
    }

    async fn lid_migrated(&self) -> bool {
        self.client.lid_migrated().await
    }

    async fn lookup(&self, phones: &[String]) -> Result<Vec<Account>, SessionError> {
        self.client.lookup(phones).await
    }
}

/// What WhatsApp knows about numbers, through the client: its LID mapping store, its
/// migration flag, and usync.
#[async_trait::async_trait]
impl Directory for Arc<Client> {
    async fn known_lid(&self, phone: &str) -> Option<String> {
        let entry = self.get_lid_pn_entry(&Jid::pn(phone.to_owned())).await;
        entry.ok().flatten().map(|entry| entry.lid.to_string())
    }

    async fn known_phone(&self, lid: &str) -> Option<String> {
        let entry = self.get_lid_pn_entry(&Jid::lid(lid.to_owned())).await;
        entry
            .ok()
            .flatten()
            .map(|entry| entry.phone_number.to_string())
    }

    async fn lid_migrated(&self) -> bool {
        self.is_lid_migrated().await
    }

    async fn lookup(&self, phones: &[String]) -> Result<Vec<Account>, SessionError> {
        let jids: Vec<Jid> = phones.iter().map(|p| Jid::pn(p.clone())).collect();
        let found = self.contacts().is_on_whatsapp(&jids).await;
        let found = found.map_err(|e| classify_lookup(&e))?;
        Ok(found
            .into_iter()
            .filter(|r| r.is_registered)
            .filter_map(|r| {
                // A LID-primary answer carries the phone number beside it.
                let (phone, lid) = if r.jid.is_lid() {
                    (r.pn_jid?, Some(r.jid))
                } else {
                    (r.jid, r.lid)
                };
                Some(Account {
                    phone: phone.user.to_string(),
                    lid: lid.map(|l| l.user.to_string()),
                })
            })
            .collect())
    }
}

/// The session's own view, for CLI commands run beside (not inside) the worker; a shared
/// session is read without being taken over.
pub async fn inspect(options: &SessionOptions) -> Result<Option<String>, OpenError> {
    match &options.store {
        SessionStore::Sqlite(path) => {
            if !path.exists() {
                return Ok(None);
            }
            let hold = SessionHold::acquire(options).await?;
            let bot = build_bot(options, &hold, &[], None, |_| {}).await?;
            Ok(paired_as(&bot.client()))
        }
        SessionStore::Postgres { sessions, instance } => {
            let device = sessions
                .reader(instance)
                .await?
                .load()
                .await
                .map_err(|e| OpenError::Store(e.to_string()))?;
            Ok(device.and_then(|d| d.pn).as_ref().map(number))
        }
    }
}

/// Whether the instance has a session to unpair.
async fn has_session(options: &SessionOptions) -> Result<bool, OpenError> {
    match &options.store {
        SessionStore::Sqlite(path) => Ok(path.exists()),
        SessionStore::Postgres { sessions, instance } => sessions
            .reader(instance)
            .await?
            .exists()
            .await
            .map_err(|e| OpenError::Store(e.to_string())),
    }
}

/// Unlinks the device (best effort: WhatsApp is told when it can be reached) and removes the
/// session.
pub async fn unpair(options: &SessionOptions) -> Result<bool, OpenError> {
    if !has_session(options).await? {
        return Ok(false);
    }
    let hold = SessionHold::acquire(options).await?;
    let bot = build_bot(options, &hold, &[], None, |_| {}).await?;
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
    match &hold {
        SessionHold::Database(store) => store
            .erase()
            .await
            .map_err(|e| OpenError::Store(e.to_string()))?,
        SessionHold::File { path, .. } => {
            for suffix in ["", "-wal", "-shm"] {
                let mut path = path.as_os_str().to_owned();
                path.push(suffix);
                let _ = std::fs::remove_file(PathBuf::from(path));
            }
        }
    }
    drop(hold);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified() {
        let no_key = AppStateError::InvalidRequest("no app state sync key available".into());
        assert_eq!(classify(&no_key), SessionError::NotConnected);
        let bad = AppStateError::InvalidRequest("mute in the past".into());
        assert!(matches!(classify(&bad), SessionError::Rejected(_)));
        // The crate's own texts for a patch verdict (`send_app_state_patch`).
        let fatal = AppStateError::Internal(anyhow::anyhow!(
            "app-state patch for regular_high rejected: fatal error 400: bad-request"
        ));
        assert!(matches!(classify(&fatal), SessionError::Rejected(_)));
        // The defect: any text with "rejected" was final, a retryable verdict too.
        let retryable = AppStateError::Internal(anyhow::anyhow!(
            "app-state patch for regular_high rejected: retryable error 500: internal"
        ));
        assert!(
            classify(&retryable).is_retryable(),
            "{:?}",
            classify(&retryable)
        );
        let conflict = AppStateError::Internal(anyhow::anyhow!(
            "app-state patch for regular_high still conflicting after 3 attempts"
        ));
        assert!(classify(&conflict).is_retryable());
        let other = AppStateError::Internal(anyhow::anyhow!("socket hiccup"));
        assert_eq!(
            classify(&other),
            SessionError::Server("socket hiccup".into())
        );
    }
}
