//! The real session: a linked device through whatsapp-rust, one SQLite session file per
//! instance, owned by one actor task. The actor holds an exclusive lock on the session file
//! while its client is open, so two clients (a worker and `pair`, or two workers) never share
//! one file. A session that was never paired is not connected: it answers "not connected"
//! until `pair` links it and the worker is told to reload. The client itself: [`client`]; the
//! chat a number stands for: [`resolve`]; the mutation sent: [`mutation`].

pub mod chat_store;
pub mod chats;
pub mod client;
pub mod gated;
pub mod mutation;
pub mod resolve;
mod throttle;

use std::sync::{Arc, Mutex};

use chrono::Utc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

use whatsapp_rust::prelude::{BotHandle, Event};

pub use client::{
    Linked, OpenError, SessionHold, SessionLock, app_state_ready, build_bot, build_gated_bot,
    chat_list_sync_failed, inspect, next_state, paired_as, unpair,
};
pub use gated::SendGate;
pub use resolve::{Account, Directory, LookupLimits};

use super::{
    ChatIndexStatus, ChatSession, Deleted, Opening, SessionError, SessionOptions, SessionState,
    SessionStatus,
};
use crate::contract::{ChatJid, ChatKnown};
use crate::fence::Fence;
use crate::telemetry;
use crate::telemetry::traces::{self, Kind, TraceContext};
use chat_store::ChatStore;
use chats::ChatIndex;
use client::operator_hint;
use mutation::{Mutation, Range};
use resolve::Resolver;
use throttle::Throttle;
use tokio::time::Instant;

/// How long before its fence's end a delete is no longer sent: the send itself takes a round
/// trip, and the fence's end is only known to this process's clock.
const SEND_MARGIN: Duration = Duration::from_secs(1);

/// How often what the chat index learned is saved (and at every close).
const INDEX_SAVE_EVERY: Duration = Duration::from_secs(5);

/// What one delete sends.
struct Plan {
    /// The chat deleted (and reported).
    key: ChatJid,
    range: Range,
    /// The same chat under its other key, deleted too while the key is uncertain.
    twin: Option<ChatJid>,
    unpin: bool,
    /// Whether the chat index held the chat.
    known: ChatKnown,
    /// How the key was chosen (a metric label).
    how: &'static str,
}

/// The index keys a command's chat may be held under: the JID given and, for a Brazilian
/// mobile number, the variant with or without the ninth digit.
fn keys_for(chat: &ChatJid) -> Vec<String> {
    match chat.server() {
        crate::contract::JidServer::Phone => resolve::candidates(chat.user())
            .into_iter()
            .map(|number| format!("{number}@s.whatsapp.net"))
            .collect(),
        _ => vec![chat.as_str().to_owned()],
    }
}

enum Msg {
    Delete {
        chat: ChatJid,
        lookup: bool,
        seen_ms: u64,
        fence: Arc<dyn Fence>,
        /// The command's trace context, for the stages the actor runs.
        trace: Option<TraceContext>,
        reply: oneshot::Sender<Result<Deleted, SessionError>>,
    },
    Reload(oneshot::Sender<Opening>),
    Close(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// What the actor needs of a linked device: the seam a test scripts. The real one is the
/// crate's client (`client.rs`).
#[async_trait::async_trait]
pub trait Device: Directory {
    /// Sends the mutation, within `timeout`; nothing goes out after `deadline` (the fence's
    /// end, less a margin), however long the device waits before sending.
    async fn send(
        &self,
        mutation: &Mutation,
        timeout: Duration,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), SessionError>;

    /// Brings the chat list deletes are built on up to date, once after the session is
    /// opened: the crate syncs app state at pairing and when the server says so, not after a
    /// restart.
    async fn catch_up(&self, timeout: Duration);

    /// Whether the chat list deletes go to is stuck: a key to build on, yet still at version
    /// 0 after a sync (whatsapp-rust 0.7.0 never leaves version 0 once a snapshot repeats an
    /// index, and every delete then fails with a conflict while the session shows connected).
    async fn chat_list_stuck(&self) -> bool {
        false
    }
}

/// A running device; for a real client, its task and the lock on its file.
struct Running {
    device: Arc<dyn Device>,
    caught_up: bool,
    handle: Option<BotHandle>,
    hold: Option<SessionHold>,
    /// Where the chat index is saved; `None` for a scripted device.
    chats: Option<ChatStore>,
}

/// The handle the pipeline holds; the actor owns the client.
pub struct WhatsappSession {
    mailbox: mpsc::Sender<Msg>,
    events: EventSink,
    status: watch::Receiver<SessionStatus>,
    /// The actor's chat index, read for `chat_known`.
    index: Arc<Mutex<ChatIndex>>,
}

/// Connection events go to the actor on their own unbounded channel: a backlog of deletes in
/// the mailbox never makes it drop a `LoggedOut` or a `Connected` (the client emits few).
#[derive(Clone)]
struct EventSink(mpsc::UnboundedSender<Arc<Event>>);

impl EventSink {
    fn deliver(&self, event: Arc<Event>) {
        // Fails only once the actor has stopped, when no state matters any more.
        let _ = self.0.send(event);
    }
}

impl WhatsappSession {
    /// Starts the instance's actor; it opens the session and connects only when it is paired.
    pub async fn start(instance: &str, options: SessionOptions) -> Self {
        let (mut actor, inbox, session) = Actor::new(instance, options);
        actor.open().await;
        tokio::spawn(actor.run(inbox));
        session
    }

    /// Starts the instance's actor with the session closed, until [`ChatSession::open`] (an
    /// instance this worker may come to own).
    pub fn closed(instance: &str, options: SessionOptions) -> Self {
        let (actor, inbox, session) = Actor::new(instance, options);
        actor.set(SessionState::Stopped, None);
        tokio::spawn(actor.run(inbox));
        session
    }

    /// An actor around a device that is already linked and connected (a scripted one in
    /// tests): no session file, no client of its own.
    pub fn connected(instance: &str, options: SessionOptions, device: Arc<dyn Device>) -> Self {
        let (mut actor, inbox, session) = Actor::new(instance, options);
        actor.running = Some(Running {
            device,
            caught_up: false,
            handle: None,
            hold: None,
            chats: None,
        });
        actor.set(SessionState::Connected, None);
        tokio::spawn(actor.run(inbox));
        session
    }

    pub fn status(&self) -> SessionStatus {
        let mut status = self.status.borrow().clone();
        let index = self.index.lock().expect("index lock");
        let coverage = index.coverage();
        status.chat_index = Some(ChatIndexStatus {
            chats: index.len(),
            synced: coverage.synced,
            overflowed: coverage.overflowed,
        });
        status
    }

    /// Feeds an event through the client's own path (tests drive transitions this way).
    pub fn inject_event(&self, event: Event) {
        self.events.deliver(Arc::new(event));
    }

    /// Sends `msg` and waits for the actor's answer (`None` once the actor has stopped).
    async fn ask<T>(&self, msg: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Option<T> {
        let (reply, done) = oneshot::channel();
        self.mailbox.send(msg(reply)).await.ok()?;
        done.await.ok()
    }
}

#[async_trait::async_trait]
impl ChatSession for WhatsappSession {
    fn state(&self) -> SessionState {
        self.status.borrow().state
    }

    async fn delete_chat_as_of(
        &self,
        chat: &ChatJid,
        lookup: bool,
        seen_ms: u64,
        fence: Arc<dyn Fence>,
    ) -> Result<Deleted, SessionError> {
        let (reply, answer) = oneshot::channel();
        let msg = Msg::Delete {
            chat: chat.clone(),
            lookup,
            seen_ms,
            fence,
            trace: traces::carry(),
            reply,
        };
        if self.mailbox.send(msg).await.is_err() {
            return Err(SessionError::NotConnected);
        }
        answer.await.unwrap_or(Err(SessionError::NotConnected))
    }

    async fn reload(&self) {
        self.ask(Msg::Reload).await;
    }

    async fn open(&self) -> Opening {
        self.ask(Msg::Reload).await.unwrap_or(Opening::Done)
    }

    async fn close(&self) {
        self.ask(Msg::Close).await;
    }

    async fn shutdown(&self) {
        self.ask(Msg::Shutdown).await;
    }

    fn details(&self) -> Option<SessionStatus> {
        Some(self.status())
    }
}

struct Actor {
    instance: String,
    options: SessionOptions,
    events: EventSink,
    status: watch::Sender<SessionStatus>,
    running: Option<Running>,
    resolver: Resolver,
    throttle: Throttle,
    index: Arc<Mutex<ChatIndex>>,
}

struct Inbox {
    mailbox: mpsc::Receiver<Msg>,
    events: mpsc::UnboundedReceiver<Arc<Event>>,
}

impl Actor {
    fn new(instance: &str, options: SessionOptions) -> (Self, Inbox, WhatsappSession) {
        let (mailbox, inbox) = mpsc::channel(256);
        let (events, event_inbox) = mpsc::unbounded_channel();
        let events = EventSink(events);
        let (status_tx, status) = watch::channel(SessionStatus {
            state: SessionState::NotPaired,
            paired_as: None,
            changed_at: Utc::now(),
            throttled_until: None,
            app_state_failed_at: None,
            app_state_stuck_since: None,
            chat_index: None,
        });
        let index = Arc::new(Mutex::new(ChatIndex::new(options.chat_index_max)));
        let actor = Actor {
            instance: instance.to_owned(),
            resolver: Resolver::new(options.lookup),
            options,
            events: events.clone(),
            status: status_tx,
            running: None,
            throttle: Throttle::default(),
            index: index.clone(),
        };
        let inbox = Inbox {
            mailbox: inbox,
            events: event_inbox,
        };
        let session = WhatsappSession {
            mailbox,
            events,
            status,
            index,
        };
        (actor, inbox, session)
    }

    fn set(&self, state: SessionState, paired_as: Option<String>) {
        self.status.send_if_modified(|s| {
            let changed = s.state != state || s.paired_as != paired_as;
            if changed {
                s.state = state;
                s.paired_as = paired_as;
                s.changed_at = Utc::now();
            }
            changed
        });
    }

    /// Opens the session file; starts the client when it holds a paired device.
    async fn open(&mut self) -> Opening {
        let hold = match SessionHold::acquire(&self.options).await {
            Ok(hold) => hold,
            Err(OpenError::NotOwner) => return Opening::Done,
            Err(error) => {
                tracing::warn!(instance = %self.instance, %error, "WhatsApp session not opened.");
                return Opening::Failed;
            }
        };
        let events = self.events.clone();
        let gate = Arc::new(SendGate::default());
        // Events arrive on the crate's tasks; the actor applies them in order.
        let bot = build_gated_bot(&self.options, &hold, gate.clone(), move |event| {
            events.deliver(event)
        })
        .await;
        let bot = match bot {
            Ok(bot) => bot,
            Err(error) => {
                tracing::error!(instance = %self.instance, %error, "WhatsApp session could not be opened.");
                return Opening::Failed;
            }
        };
        let client = bot.client();
        let Some(number) = paired_as(&client) else {
            tracing::warn!(
                instance = %self.instance,
                "WhatsApp instance is not paired; it answers 503 until `chat-delete-worker pair {}` links it and the worker is reloaded (SIGHUP)",
                self.instance
            );
            self.set(SessionState::NotPaired, None);
            return Opening::Done;
        };
        self.set(SessionState::Connecting, Some(number));
        let chats = ChatStore::of(&hold);
        self.load_index(&chats).await;
        self.running = Some(Running {
            device: Arc::new(Linked::new(client, gate)),
            caught_up: false,
            handle: Some(bot.spawn()),
            hold: Some(hold),
            chats: Some(chats),
        });
        Opening::Done
    }

    /// Disconnects (flushing the session and the chat index) within the deadline, then
    /// aborts.
    async fn stop_client(&mut self) {
        self.save_index().await;
        if let Some(Running {
            handle: Some(handle),
            ..
        }) = self.running.take()
        {
            // Dropping the handle when the deadline passes aborts the client.
            let stopped =
                tokio::time::timeout(self.options.shutdown_deadline, handle.shutdown()).await;
            if stopped.is_err() {
                tracing::warn!(instance = %self.instance, "WhatsApp client did not stop in time; aborted.");
            }
        }
    }

    async fn run(mut self, mut inbox: Inbox) {
        let mut save = tokio::time::interval(INDEX_SAVE_EVERY);
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // State changes first: a delete never waits behind a stale "connected".
            let msg = tokio::select! {
                biased;
                Some(event) = inbox.events.recv() => {
                    self.apply(&event).await;
                    continue;
                }
                _ = save.tick() => {
                    self.save_index().await;
                    continue;
                }
                msg = inbox.mailbox.recv() => msg,
            };
            let Some(msg) = msg else { break };
            match msg {
                Msg::Delete {
                    chat,
                    lookup,
                    seen_ms,
                    fence,
                    trace,
                    reply,
                } => {
                    // Deletes wait here one at a time: one whose requester has gone (handed
                    // back, timed out) is not sent.
                    if reply.is_closed() {
                        continue;
                    }
                    let deleting = self.delete(&chat, lookup, seen_ms, &*fence);
                    let deleted = traces::within(trace, deleting).await;
                    if deleted.is_err() && self.superseded() {
                        // Reported as replaced: an owner that still holds the lease opens
                        // the session again (the ownership coordinator does).
                        tracing::warn!(instance = %self.instance, "The session was opened again elsewhere; its writes are refused.");
                        let paired = self.status.borrow().paired_as.clone();
                        self.set(SessionState::Replaced, paired);
                    }
                    let _ = reply.send(deleted);
                }
                Msg::Reload(done) => {
                    let opening = match self.running {
                        None => self.open().await,
                        Some(_) => Opening::Done,
                    };
                    let _ = done.send(opening);
                }
                Msg::Close(done) => {
                    self.close().await;
                    let _ = done.send(());
                }
                Msg::Shutdown(done) => {
                    self.close().await;
                    let _ = done.send(());
                    break;
                }
            }
        }
    }

    /// Whether the shared store refused a write because the session was opened again since.
    fn superseded(&self) -> bool {
        matches!(
            &self.running,
            Some(Running { hold: Some(SessionHold::Database(store)), .. }) if store.superseded()
        )
    }

    /// Stops the client; the session stays paired (its file is kept) for a later open.
    async fn close(&mut self) {
        self.stop_client().await;
        let paired = self.status.borrow().paired_as.clone();
        self.set(SessionState::Stopped, paired);
    }

    /// Sends the chat's delete if the fence still holds, and not after the fence's end. The
    /// chat index picks the key the phone holds and the range (the chat's last message as of
    /// `seen_ms`); a chat it does not hold is resolved, and deleted under that key and, while
    /// the index cannot tell, under its twin too. The chat is unpinned with it.
    async fn delete(
        &mut self,
        chat: &ChatJid,
        lookup: bool,
        seen_ms: u64,
        fence: &dyn Fence,
    ) -> Result<Deleted, SessionError> {
        if let Some(left) = self.throttle.left(Instant::now()) {
            return Err(SessionError::Server(format!(
                "WhatsApp is throttling this instance (429); deletes resume in {} s",
                left.as_secs().max(1)
            )));
        }
        let Some(running) = &mut self.running else {
            return Err(SessionError::NotConnected);
        };
        let device = running.device.clone();
        if !running.caught_up {
            device.catch_up(self.options.delete_timeout).await;
            running.caught_up = true;
        }
        let plan = self.plan(chat, lookup, seen_ms, &*device).await?;
        fence.check().map_err(SessionError::Fenced)?;
        let deadline = fence.valid_until().map(|end| end - SEND_MARGIN);
        if deadline.is_some_and(|d| d <= tokio::time::Instant::now()) {
            return Err(SessionError::Fenced(crate::fence::Fenced(
                "the fence ends before the delete could be sent",
            )));
        }
        let at_ms = i64::try_from(seen_ms).unwrap_or(i64::MAX);
        let key = mutation::to_jid(&plan.key);
        let mutation = Mutation::delete_chat(&key, &plan.range, at_ms);
        let timeout = self.options.delete_timeout;
        let send = device.send(&mutation, timeout, deadline);
        let sent = traces::stage("send app state patch", Kind::Client, send).await;
        self.watch_stuck(&sent, &*device).await;
        sent?;
        self.count_key(plan.how);
        // The twin and the pin are extras: the delete under the key chosen decides the
        // answer, and a later try repeats them with the same bytes.
        if let Some(twin) = &plan.twin {
            let mutation = Mutation::delete_chat(&mutation::to_jid(twin), &plan.range, at_ms);
            match device.send(&mutation, timeout, deadline).await {
                Ok(()) => self.count_key("candidate"),
                Err(error) => {
                    tracing::warn!(instance = %self.instance, %error, "The delete under the chat's other key was not sent.");
                }
            }
        }
        if plan.unpin {
            let unpin = Mutation::unpin(&key, at_ms);
            if let Err(error) = device.send(&unpin, timeout, deadline).await {
                metrics::counter!(telemetry::UNPINS_FAILED).increment(1);
                tracing::warn!(instance = %self.instance, %error, "The chat was deleted but not unpinned; it comes back pinned if it comes back.");
            }
        }
        self.index
            .lock()
            .expect("index lock")
            .deleted(plan.key.as_str(), plan.range.last_message_s);
        Ok(Deleted {
            chat: plan.key,
            known: plan.known,
        })
    }

    /// What a delete of `chat` sends: from the index when it holds the chat, else from
    /// resolution.
    async fn plan(
        &mut self,
        chat: &ChatJid,
        lookup: bool,
        seen_ms: u64,
        device: &dyn Device,
    ) -> Result<Plan, SessionError> {
        let seen = i64::try_from(seen_ms).unwrap_or(i64::MAX);
        let held = |index: &Mutex<ChatIndex>, keys: &[String]| {
            let index = index.lock().expect("index lock");
            index.find_any(keys.iter().map(String::as_str)).cloned()
        };
        let given = if lookup {
            keys_for(chat)
        } else {
            vec![chat.as_str().to_owned()]
        };
        let mut found = held(&self.index, &given);
        let mut resolved = None;
        if found.is_none() {
            let resolve = self.resolver.resolve(chat, lookup, device);
            let resolve = traces::stage("resolve", Kind::Internal, resolve);
            let target = tokio::time::timeout(self.options.delete_timeout, resolve)
                .await
                .map_err(|_| SessionError::Timeout)??;
            found = held(&self.index, &[target.as_str().to_owned()]);
            resolved = Some(target);
        }
        if let Some(indexed) = found
            && let Some(key) = crate::contract::normalise_number(&indexed.jid)
        {
            return Ok(Plan {
                key,
                range: indexed.range_as_of(seen),
                twin: None,
                unpin: indexed.pinned,
                known: ChatKnown::True,
                how: "indexed",
            });
        }
        let key = resolved.unwrap_or_else(|| chat.clone());
        let (coverage, known) = {
            let index = self.index.lock().expect("index lock");
            (index.coverage(), index.known([key.as_str()]))
        };
        // Without the phone's chat list, the key stays uncertain: the twin is sent too (an
        // index the phone does not hold is a no-op there), and the pin is cleared blind.
        let uncertain = lookup && !coverage.synced;
        let twin = if uncertain {
            resolve::twin(&key, device).await
        } else {
            None
        };
        Ok(Plan {
            key,
            range: Range::until(seen),
            twin,
            unpin: !coverage.synced,
            known,
            how: "resolved",
        })
    }

    fn count_key(&self, how: &'static str) {
        metrics::counter!(telemetry::DELETE_KEYS_SENT, "how" => how).increment(1);
    }

    /// After a delete that failed on a conflict, whether the chat list is stuck; after one
    /// that went through, that it is not.
    async fn watch_stuck(&self, sent: &Result<(), SessionError>, device: &dyn Device) {
        let stuck = match sent {
            Ok(()) => false,
            Err(SessionError::Server(text) | SessionError::Rejected(text))
                if text.contains("conflict") || text.contains("409") =>
            {
                device.chat_list_stuck().await
            }
            Err(_) => return,
        };
        let gauge =
            metrics::gauge!(telemetry::APP_STATE_STUCK, "wa_instance" => self.instance.clone());
        gauge.set(if stuck { 1.0 } else { 0.0 });
        self.status.send_if_modified(|s| {
            let was = s.app_state_stuck_since.is_some();
            if stuck && !was {
                tracing::error!(instance = %self.instance, "The chat list's app state is stuck at version 0 and every delete conflicts: unpair and pair the instance again.");
                s.app_state_stuck_since = Some(Utc::now());
            } else if !stuck {
                s.app_state_stuck_since = None;
            }
            stuck != was
        });
    }

    /// Loads the instance's chat index from where the session is kept.
    async fn load_index(&mut self, store: &ChatStore) {
        match store.load(self.options.chat_index_max).await {
            Ok(index) => {
                self.gauge_chats(index.len());
                *self.index.lock().expect("index lock") = index;
            }
            Err(error) => {
                tracing::warn!(instance = %self.instance, %error, "The chat index could not be read; it starts empty (chat_known says unknown).");
                *self.index.lock().expect("index lock") =
                    ChatIndex::new(self.options.chat_index_max);
            }
        }
    }

    /// Saves what the chat index learned since the last save.
    async fn save_index(&mut self) {
        let Some(Running {
            chats: Some(store), ..
        }) = &self.running
        else {
            return;
        };
        let (changes, len) = {
            let mut index = self.index.lock().expect("index lock");
            (index.changes(), index.len())
        };
        self.gauge_chats(len);
        if let Err(error) = store.save(changes).await {
            tracing::warn!(instance = %self.instance, %error, "The chat index could not be saved; it is rebuilt from messages as they come.");
        }
    }

    fn gauge_chats(&self, len: usize) {
        metrics::gauge!(telemetry::CHATS_INDEXED, "wa_instance" => self.instance.clone())
            .set(len as f64);
    }

    async fn apply(&mut self, event: &Event) {
        if let Event::HistorySync(sync) = event {
            chats::merge_history(&self.index, sync).await;
            return;
        }
        self.index.lock().expect("index lock").apply(event);
        if throttle::is_throttling(event) {
            let wait = self.throttle.hit(Instant::now());
            metrics::counter!(telemetry::WHATSAPP_THROTTLED, "wa_instance" => self.instance.clone())
                .increment(1);
            tracing::warn!(instance = %self.instance, wait_s = wait.as_secs(), "WhatsApp is throttling the instance (429); its deletes wait.");
            let until = Utc::now() + wait;
            self.status.send_modify(|s| s.throttled_until = Some(until));
        }
        if let Some(how) = chat_list_sync_failed(event) {
            metrics::counter!(telemetry::APP_STATE_SYNC_FAILED, "wa_instance" => self.instance.clone(), "how" => how)
                .increment(1);
            tracing::warn!(instance = %self.instance, how, "The chat list's app state (regular_high) did not sync; deletes may not land until it does.");
            self.status
                .send_modify(|s| s.app_state_failed_at = Some(Utc::now()));
        }
        let Some(state) = next_state(event) else {
            return;
        };
        let paired = self.status.borrow().paired_as.clone();
        self.set(state, paired);
        if let Some(hint) = operator_hint(&self.instance, state) {
            // Parked: no reconnect storm; an operator decides what happens next.
            tracing::error!(instance = %self.instance, "{hint}");
            self.stop_client().await;
        }
    }
}

#[cfg(test)]
mod tests;
