//! The real session: a linked device through whatsapp-rust, one SQLite session file per
//! instance, owned by one actor task. The actor holds an exclusive lock on the session file
//! while its client is open, so two clients (a worker and `pair`, or two workers) never share
//! one file. A session that was never paired is not connected: it answers "not connected"
//! until `pair` links it and the worker is told to reload. The client itself: [`client`].

pub mod client;

use std::sync::Arc;

use chrono::Utc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

use whatsapp_rust::prelude::{BotHandle, Event};

pub use client::{OpenError, SessionLock, build_bot, inspect, next_state, paired_as, unpair};

use super::{ChatSession, SessionError, SessionOptions, SessionState, SessionStatus};
use crate::fence::Fence;
use crate::pipeline::request::ChatJid;
use client::operator_hint;

enum Msg {
    Delete {
        chat: ChatJid,
        delete_media: bool,
        fence: Arc<dyn Fence>,
        reply: oneshot::Sender<Result<(), SessionError>>,
    },
    Event(Arc<Event>),
    Reload(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// What the actor needs of a linked device: the seam a test scripts. The real one is the
/// crate's client (`client.rs`).
#[async_trait::async_trait]
pub trait Device: Send + Sync {
    /// Sends the delete, within `timeout`.
    async fn delete_chat(
        &self,
        chat: &ChatJid,
        delete_media: bool,
        timeout: Duration,
    ) -> Result<(), SessionError>;
}

/// A running device; for a real client, its task and the lock on its file.
struct Running {
    device: Arc<dyn Device>,
    handle: Option<BotHandle>,
    _lock: Option<SessionLock>,
}

/// The handle the pipeline holds; the actor owns the client.
pub struct WhatsappSession {
    mailbox: mpsc::Sender<Msg>,
    status: watch::Receiver<SessionStatus>,
}

impl WhatsappSession {
    /// Starts the instance's actor; it opens the session and connects only when it is paired.
    pub async fn start(instance: &str, options: SessionOptions) -> Self {
        let (mut actor, inbox, session) = Actor::new(instance, options);
        actor.open().await;
        tokio::spawn(actor.run(inbox));
        session
    }

    /// An actor around a device that is already linked and connected (a scripted one in
    /// tests): no session file, no client of its own.
    pub fn connected(instance: &str, options: SessionOptions, device: Arc<dyn Device>) -> Self {
        let (mut actor, inbox, session) = Actor::new(instance, options);
        actor.running = Some(Running {
            device,
            handle: None,
            _lock: None,
        });
        actor.set(SessionState::Connected, None);
        tokio::spawn(actor.run(inbox));
        session
    }

    pub fn status(&self) -> SessionStatus {
        self.status.borrow().clone()
    }

    /// Feeds an event as if the client had emitted it (tests drive transitions this way).
    pub async fn inject_event(&self, event: Event) {
        let _ = self.mailbox.send(Msg::Event(Arc::new(event))).await;
    }

    async fn ask(&self, msg: impl FnOnce(oneshot::Sender<()>) -> Msg) {
        let (reply, done) = oneshot::channel();
        if self.mailbox.send(msg(reply)).await.is_ok() {
            let _ = done.await;
        }
    }
}

#[async_trait::async_trait]
impl ChatSession for WhatsappSession {
    fn state(&self) -> SessionState {
        self.status.borrow().state
    }

    async fn delete_chat(
        &self,
        chat: &ChatJid,
        delete_media: bool,
        fence: Arc<dyn Fence>,
    ) -> Result<(), SessionError> {
        let (reply, answer) = oneshot::channel();
        let msg = Msg::Delete {
            chat: chat.clone(),
            delete_media,
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
    mailbox: mpsc::Sender<Msg>,
    status: watch::Sender<SessionStatus>,
    running: Option<Running>,
}

impl Actor {
    fn new(
        instance: &str,
        options: SessionOptions,
    ) -> (Self, mpsc::Receiver<Msg>, WhatsappSession) {
        let (mailbox, inbox) = mpsc::channel(256);
        let (status_tx, status) = watch::channel(SessionStatus {
            state: SessionState::NotPaired,
            paired_as: None,
            changed_at: Utc::now(),
        });
        let actor = Actor {
            instance: instance.to_owned(),
            options,
            mailbox: mailbox.clone(),
            status: status_tx,
            running: None,
        };
        (actor, inbox, WhatsappSession { mailbox, status })
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
    async fn open(&mut self) {
        if self.running.is_some() {
            return;
        }
        let lock = match SessionLock::acquire(&self.options.store_path) {
            Ok(lock) => lock,
            Err(error) => {
                tracing::warn!(instance = %self.instance, %error, "WhatsApp session not opened.");
                return;
            }
        };
        let mailbox = self.mailbox.clone();
        let bot = build_bot(&self.options, &[], None, move |event| {
            // Events arrive on the crate's tasks; the actor applies them in order.
            let _ = mailbox.try_send(Msg::Event(event));
        })
        .await;
        let bot = match bot {
            Ok(bot) => bot,
            Err(error) => {
                tracing::error!(instance = %self.instance, %error, "WhatsApp session could not be opened.");
                return;
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
            return;
        };
        self.set(SessionState::Connecting, Some(number));
        self.running = Some(Running {
            device: client,
            handle: Some(bot.spawn()),
            _lock: Some(lock),
        });
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

    async fn run(mut self, mut inbox: mpsc::Receiver<Msg>) {
        while let Some(msg) = inbox.recv().await {
            match msg {
                Msg::Delete {
                    chat,
                    delete_media,
                    fence,
                    reply,
                } => {
                    // Deletes wait here one at a time: one whose requester has gone (handed
                    // back, timed out) or whose claim lapsed meanwhile is not sent.
                    if reply.is_closed() {
                        continue;
                    }
                    if let Err(fenced) = fence.check() {
                        let _ = reply.send(Err(SessionError::Fenced(fenced)));
                        continue;
                    }
                    let result = match &self.running {
                        Some(running) => {
                            let timeout = self.options.delete_timeout;
                            running
                                .device
                                .delete_chat(&chat, delete_media, timeout)
                                .await
                        }
                        None => Err(SessionError::NotConnected),
                    };
                    let _ = reply.send(result);
                }
                Msg::Event(event) => {
                    let Some(state) = next_state(&event) else {
                        continue;
                    };
                    let paired = self.status.borrow().paired_as.clone();
                    self.set(state, paired);
                    if let Some(hint) = operator_hint(&self.instance, state) {
                        // Parked: no reconnect storm; an operator decides what happens next.
                        tracing::error!(instance = %self.instance, "{hint}");
                        self.stop_client().await;
                    }
                }
                Msg::Reload(done) => {
                    if self.running.is_none() {
                        self.open().await;
                    }
                    let _ = done.send(());
                }
                Msg::Shutdown(done) => {
                    self.stop_client().await;
                    let paired = self.status.borrow().paired_as.clone();
                    self.set(SessionState::Stopped, paired);
                    let _ = done.send(());
                    break;
                }
            }
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

    /// A device that takes `latency` per delete and records what it was sent.
    struct Scripted {
        latency: Duration,
        sent: Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl Device for Scripted {
        async fn delete_chat(
            &self,
            chat: &ChatJid,
            _: bool,
            _: Duration,
        ) -> Result<(), SessionError> {
            tokio::time::sleep(self.latency).await;
            self.sent.lock().unwrap().push(chat.to_string());
            Ok(())
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
        });
        let options = SessionOptions {
            store_path: PathBuf::from("unused.db"),
            delete_timeout: Duration::from_secs(5),
            shutdown_deadline: Duration::from_secs(1),
            transport_url: None,
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
        assert_eq!(first.await.unwrap(), Ok(()));
        assert_eq!(third, Ok(()));
        assert_eq!(
            *device.sent.lock().unwrap(),
            [
                "5511000000001@s.whatsapp.net",
                "5511000000003@s.whatsapp.net"
            ]
        );
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
        assert!(device.sent.lock().unwrap().is_empty());
        assert_eq!(session.state(), SessionState::Connected);
    }
}
