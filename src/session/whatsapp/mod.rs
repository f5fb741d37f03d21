//! The real session: a linked device through whatsapp-rust, one SQLite session file per
//! instance, owned by one actor task. The actor holds an exclusive lock on the session file
//! while its client is open, so two clients (a worker and `pair`, or two workers) never share
//! one file. A session that was never paired is not connected: it answers "not connected"
//! until `pair` links it and the worker is told to reload. The client itself: [`client`]; the
//! chat a number stands for: [`resolve`]; the mutation sent: [`mutation`].

pub mod client;
pub mod gated;
pub mod mutation;
pub mod resolve;
mod throttle;

use std::sync::Arc;

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

use super::{ChatSession, Opening, SessionError, SessionOptions, SessionState, SessionStatus};
use crate::contract::ChatJid;
use crate::fence::Fence;
use crate::telemetry;
use crate::telemetry::traces::{self, Kind, TraceContext};
use client::operator_hint;
use mutation::DeleteChat;
use resolve::Resolver;
use throttle::Throttle;
use tokio::time::Instant;

/// How long before its fence's end a delete is no longer sent: the send itself takes a round
/// trip, and the fence's end is only known to this process's clock.
const SEND_MARGIN: Duration = Duration::from_secs(1);

enum Msg {
    Delete {
        chat: ChatJid,
        lookup: bool,
        seen_ms: u64,
        fence: Arc<dyn Fence>,
        /// The command's trace context, for the stages the actor runs.
        trace: Option<TraceContext>,
        reply: oneshot::Sender<Result<ChatJid, SessionError>>,
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
        mutation: &DeleteChat,
        timeout: Duration,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), SessionError>;

    /// Brings the chat list deletes are built on up to date, once after the session is
    /// opened: the crate syncs app state at pairing and when the server says so, not after a
    /// restart.
    async fn catch_up(&self, timeout: Duration);
}

/// A running device; for a real client, its task and the lock on its file.
struct Running {
    device: Arc<dyn Device>,
    caught_up: bool,
    handle: Option<BotHandle>,
    hold: Option<SessionHold>,
}

/// The handle the pipeline holds; the actor owns the client.
pub struct WhatsappSession {
    mailbox: mpsc::Sender<Msg>,
    events: EventSink,
    status: watch::Receiver<SessionStatus>,
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
        });
        actor.set(SessionState::Connected, None);
        tokio::spawn(actor.run(inbox));
        session
    }

    pub fn status(&self) -> SessionStatus {
        self.status.borrow().clone()
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
    ) -> Result<ChatJid, SessionError> {
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
        });
        let actor = Actor {
            instance: instance.to_owned(),
            resolver: Resolver::new(options.lookup),
            options,
            events: events.clone(),
            status: status_tx,
            running: None,
            throttle: Throttle::default(),
        };
        let inbox = Inbox {
            mailbox: inbox,
            events: event_inbox,
        };
        let session = WhatsappSession {
            mailbox,
            events,
            status,
        };
        (actor, inbox, session)
    }

    fn set(&self, state: SessionState, paired_as: Option<String>) {
        self.status.send_if_modified(|s| {
            let changed = s.state != state || s.paired_as != paired_as;
            if changed {
                *s = SessionStatus {
                    state,
                    paired_as,
                    changed_at: Utc::now(),
                    throttled_until: s.throttled_until,
                    app_state_failed_at: s.app_state_failed_at,
                };
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
        self.running = Some(Running {
            device: Arc::new(Linked::new(client, gate)),
            caught_up: false,
            handle: Some(bot.spawn()),
            hold: Some(hold),
        });
        Opening::Done
    }

    /// Disconnects (flushing the session) within the deadline, then aborts.
    async fn stop_client(&mut self) {
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
        loop {
            // State changes first: a delete never waits behind a stale "connected".
            let msg = tokio::select! {
                biased;
                Some(event) = inbox.events.recv() => {
                    self.apply(&event).await;
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

    /// Resolves the chat, then sends its delete (the chat as of `seen_ms`) if the fence still
    /// holds, and not after the fence's end.
    async fn delete(
        &mut self,
        chat: &ChatJid,
        lookup: bool,
        seen_ms: u64,
        fence: &dyn Fence,
    ) -> Result<ChatJid, SessionError> {
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
        let resolve = self.resolver.resolve(chat, lookup, &*device);
        let resolve = traces::stage("resolve", Kind::Internal, resolve);
        let target = tokio::time::timeout(self.options.delete_timeout, resolve)
            .await
            .map_err(|_| SessionError::Timeout)??;
        fence.check().map_err(SessionError::Fenced)?;
        let deadline = fence.valid_until().map(|end| end - SEND_MARGIN);
        if deadline.is_some_and(|d| d <= tokio::time::Instant::now()) {
            return Err(SessionError::Fenced(crate::fence::Fenced(
                "the fence ends before the delete could be sent",
            )));
        }
        let at_ms = i64::try_from(seen_ms).unwrap_or(i64::MAX);
        let mutation = DeleteChat::new(&mutation::to_jid(&target), at_ms);
        let timeout = self.options.delete_timeout;
        let send = device.send(&mutation, timeout, deadline);
        traces::stage("send app state patch", Kind::Client, send).await?;
        Ok(target)
    }

    async fn apply(&mut self, event: &Event) {
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
