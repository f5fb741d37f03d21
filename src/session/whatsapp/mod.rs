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

use std::sync::Arc;

use chrono::Utc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

use whatsapp_rust::prelude::{BotHandle, Event};

pub use client::{
    Linked, OpenError, SessionHold, SessionLock, app_state_ready, build_bot, build_gated_bot,
    inspect, next_state, paired_as, unpair,
};
pub use gated::SendGate;
pub use resolve::{Account, Directory, LookupLimits};

use super::{ChatSession, Opening, SessionError, SessionOptions, SessionState, SessionStatus};
use crate::fence::Fence;
use crate::pipeline::request::ChatJid;
use client::operator_hint;
use mutation::DeleteChat;
use resolve::Resolver;

/// How long before its fence's end a delete is no longer sent: the send itself takes a round
/// trip, and the fence's end is only known to this process's clock.
const SEND_MARGIN: Duration = Duration::from_secs(1);

enum Msg {
    Delete {
        chat: ChatJid,
        lookup: bool,
        seen_ms: u64,
        fence: Arc<dyn Fence>,
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
        });
        let actor = Actor {
            instance: instance.to_owned(),
            resolver: Resolver::new(options.lookup),
            options,
            events: events.clone(),
            status: status_tx,
            running: None,
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
                    reply,
                } => {
                    // Deletes wait here one at a time: one whose requester has gone (handed
                    // back, timed out) is not sent.
                    if reply.is_closed() {
                        continue;
                    }
                    let deleted = self.delete(&chat, lookup, seen_ms, &*fence).await;
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
        let Some(running) = &mut self.running else {
            return Err(SessionError::NotConnected);
        };
        let device = running.device.clone();
        if !running.caught_up {
            device.catch_up(self.options.delete_timeout).await;
            running.caught_up = true;
        }
        let resolve = self.resolver.resolve(chat, lookup, &*device);
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
        let mutation = DeleteChat::new(&client::to_jid(&target), at_ms);
        let timeout = self.options.delete_timeout;
        device.send(&mutation, timeout, deadline).await?;
        Ok(target)
    }

    async fn apply(&mut self, event: &Event) {
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
mod tests {
    use std::path::PathBuf;
    use std::sync::Mutex;

    use super::*;
    use crate::fence::{Fenced, Unfenced};
    use crate::pipeline::request::normalise_number;

    /// A device that takes `latency` per delete, knows no accounts, and records the index
    /// arguments it was sent.
    struct Scripted {
        latency: Duration,
        sent: Mutex<Vec<String>>,
        /// The timestamp of each mutation sent.
        stamps: Mutex<Vec<i64>>,
    }

    #[async_trait::async_trait]
    impl Directory for Scripted {
        async fn known_lid(&self, _: &str) -> Option<String> {
            None
        }
        async fn known_phone(&self, _: &str) -> Option<String> {
            None
        }
        async fn lid_migrated(&self) -> bool {
            false
        }
        async fn lookup(&self, _: &[String]) -> Result<Vec<Account>, SessionError> {
            Ok(vec![])
        }
    }

    #[async_trait::async_trait]
    impl Device for Scripted {
        async fn send(
            &self,
            mutation: &DeleteChat,
            _: Duration,
            _: Option<tokio::time::Instant>,
        ) -> Result<(), SessionError> {
            tokio::time::sleep(self.latency).await;
            self.sent
                .lock()
                .unwrap()
                .push(mutation.index_args().join(" "));
            let stamp = mutation.value.timestamp.unwrap_or_default();
            self.stamps.lock().unwrap().push(stamp);
            Ok(())
        }

        async fn catch_up(&self, _: Duration) {
            self.sent.lock().unwrap().push("catch up".into());
        }
    }

    struct Refused;

    impl Fence for Refused {
        fn check(&self) -> Result<(), Fenced> {
            Err(Fenced("the claim was taken over"))
        }
    }

    fn session(latency_ms: u64) -> (WhatsappSession, Arc<Scripted>) {
        let device = Arc::new(Scripted {
            latency: Duration::from_millis(latency_ms),
            sent: Mutex::new(vec![]),
            stamps: Mutex::new(vec![]),
        });
        let options = SessionOptions {
            store: crate::session::SessionStore::Sqlite(PathBuf::from("unused.db")),
            owner: None,
            delete_timeout: Duration::from_secs(5),
            shutdown_deadline: Duration::from_secs(1),
            transport_url: None,
            lookup: LookupLimits {
                cache_ttl: Duration::from_secs(60),
                per_minute: 60,
            },
        };
        let session = WhatsappSession::connected("scripted", options, device.clone());
        (session, device)
    }

    /// Deletes wait in the session one at a time; one whose requester gave up while it waited
    /// (a command handed back) is never sent.
    #[tokio::test(start_paused = true)]
    async fn a_queued_delete_whose_requester_has_gone_is_not_sent() {
        let (session, device) = session(1_000);
        let session = Arc::new(session);
        let chat = |n: &str| normalise_number(n).unwrap();
        let first = tokio::spawn({
            let session = session.clone();
            async move {
                session
                    .delete_chat(&chat("5511000000001"), false, Arc::new(Unfenced))
                    .await
            }
        });
        tokio::task::yield_now().await;
        let gave_up = tokio::time::timeout(
            Duration::from_millis(100),
            session.delete_chat(&chat("5511000000002"), false, Arc::new(Unfenced)),
        )
        .await;
        assert!(gave_up.is_err(), "the second delete waits behind the first");
        let third = session
            .delete_chat(&chat("5511000000003"), false, Arc::new(Unfenced))
            .await;
        assert_eq!(first.await.unwrap(), Ok(chat("5511000000001")));
        assert_eq!(third, Ok(chat("5511000000003")));
        assert_eq!(
            *device.sent.lock().unwrap(),
            [
                "catch up",
                "5511000000001@s.whatsapp.net 0",
                "5511000000003@s.whatsapp.net 0"
            ]
        );
    }

    /// Defect (found by review): the delete runs in the actor, outside the command's future.
    /// A command dropped while its delete was being sent (a hard stop) left the send going,
    /// and the next try sent a new mutation stamped with the time of that try, which also
    /// deletes what arrived in between. Every try of one command (the same first-seen time)
    /// sends the same mutation.
    #[tokio::test]
    async fn a_delete_tried_again_after_its_command_was_dropped_sends_the_same_mutation() {
        let (session, device) = session(1_000);
        let chat = normalise_number("5511000000001").unwrap();
        let seen_ms = 1_733_000_000_123;
        let dropped = tokio::time::timeout(
            Duration::from_millis(100),
            session.delete_chat_as_of(&chat, false, seen_ms, Arc::new(Unfenced)),
        )
        .await;
        assert!(dropped.is_err(), "the first try was dropped mid-send");
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert_eq!(device.stamps.lock().unwrap().len(), 1, "the send went on");
        let again = session
            .delete_chat_as_of(&chat, false, seen_ms, Arc::new(Unfenced))
            .await;
        assert_eq!(again, Ok(chat));
        let stamps = device.stamps.lock().unwrap().clone();
        assert_eq!(
            stamps,
            [seen_ms as i64, seen_ms as i64],
            "the same mutation both times"
        );
    }

    /// A fence whose end has (nearly) come.
    struct Ending;

    impl Fence for Ending {
        fn check(&self) -> Result<(), Fenced> {
            Ok(())
        }

        fn valid_until(&self) -> Option<tokio::time::Instant> {
            Some(tokio::time::Instant::now() + Duration::from_millis(500))
        }
    }

    /// Defect (found by review): the fence was checked before the crate waited for its own
    /// send lock and any running sync; only the delete timeout (longer than the lease) bounded
    /// that wait, so a send could start after the lease and the claim ended. A fence that ends
    /// within the send margin is not sent at all; the device is told the deadline otherwise.
    #[tokio::test]
    async fn a_delete_is_not_sent_when_its_fence_ends_before_it_could_be() {
        let (session, device) = session(0);
        let chat = normalise_number("5511000000001").unwrap();
        let refused = session.delete_chat(&chat, false, Arc::new(Ending)).await;
        assert!(
            matches!(refused, Err(SessionError::Fenced(_))),
            "{refused:?}"
        );
        assert_eq!(*device.sent.lock().unwrap(), ["catch up"]);
    }

    #[tokio::test]
    async fn a_delete_whose_fence_no_longer_holds_is_not_sent() {
        let (session, device) = session(0);
        let chat = normalise_number("5511000000001").unwrap();
        let refused = session.delete_chat(&chat, false, Arc::new(Refused)).await;
        assert_eq!(
            refused,
            Err(SessionError::Fenced(Fenced("the claim was taken over")))
        );
        assert_eq!(*device.sent.lock().unwrap(), ["catch up"]);
        assert_eq!(session.state(), SessionState::Connected);
    }

    /// The defect: events reached the actor through `try_send` on the 256-slot mailbox, so a
    /// backlog of deletes made it drop a `LoggedOut`, and the instance kept "connected".
    #[tokio::test(start_paused = true)]
    async fn state_events_are_never_dropped_behind_a_backlog_of_deletes() {
        use whatsapp_rust::types::events::{ConnectFailureReason, LoggedOut};

        let (session, device) = session(1_000);
        let session = Arc::new(session);
        let mut waiting = Vec::new();
        for n in 0..300 {
            let session = session.clone();
            waiting.push(tokio::spawn(async move {
                let chat = normalise_number(&format!("55110000{n:05}")).unwrap();
                session.delete_chat(&chat, true, Arc::new(Unfenced)).await
            }));
        }
        while session.mailbox.capacity() > 0 {
            tokio::task::yield_now().await;
        }
        session.inject_event(Event::LoggedOut(
            LoggedOut::builder()
                .on_connect(false)
                .reason(ConnectFailureReason::LoggedOut)
                .build(),
        ));
        let mut not_connected = 0;
        for delete in waiting {
            if delete.await.unwrap() == Err(SessionError::NotConnected) {
                not_connected += 1;
            }
        }
        assert_eq!(session.state(), SessionState::LoggedOut);
        assert!(
            not_connected >= 298,
            "{not_connected}: the logout was applied at once"
        );
        assert!(device.sent.lock().unwrap().len() <= 3);
    }

    /// The defect: `deleteMedia` went into the mutation's index ("1"), asking the phone and
    /// every linked device to delete the chat's media too.
    #[tokio::test]
    async fn the_phone_is_never_asked_to_delete_media() {
        let (session, device) = session(0);
        let chat = normalise_number("120363024567890123@g.us").unwrap();
        let deleted = session.delete_chat(&chat, false, Arc::new(Unfenced)).await;
        assert_eq!(deleted, Ok(chat));
        assert_eq!(
            *device.sent.lock().unwrap(),
            ["catch up", "120363024567890123@g.us 0"]
        );
    }
}
