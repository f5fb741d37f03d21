//! The real session: a linked device through whatsapp-rust, one SQLite session file per
//! instance, owned by one actor task. The actor holds an exclusive lock on the session file
//! while its client is open, so two clients (a worker and `pair`, or two workers) never share
//! one file. A session that was never paired is not connected: it answers "not connected"
//! until `pair` links it and the worker is told to reload. The client itself: [`client`].

pub mod client;

use std::sync::Arc;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot, watch};
use whatsapp_rust::prelude::{BotHandle, Client, Event};

pub use client::{
    OpenError, SessionLock, build_bot, delete_on_client, inspect, next_state, paired_as, unpair,
};

use super::{ChatSession, SessionError, SessionOptions, SessionState, SessionStatus};
use crate::pipeline::request::ChatJid;
use client::operator_hint;

enum Msg {
    Delete {
        chat: ChatJid,
        delete_media: bool,
        reply: oneshot::Sender<Result<(), SessionError>>,
    },
    Event(Arc<Event>),
    Reload(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// A running client and the lock on its file.
struct Running {
    client: Arc<Client>,
    handle: BotHandle,
    _lock: SessionLock,
}

/// The handle the pipeline holds; the actor owns the client.
pub struct WhatsappSession {
    mailbox: mpsc::Sender<Msg>,
    status: watch::Receiver<SessionStatus>,
}

impl WhatsappSession {
    /// Starts the instance's actor; it opens the session and connects only when it is paired.
    pub async fn start(instance: &str, options: SessionOptions) -> Self {
        let (mailbox, inbox) = mpsc::channel(256);
        let (status_tx, status) = watch::channel(SessionStatus {
            state: SessionState::NotPaired,
            paired_as: None,
            changed_at: Utc::now(),
        });
        let mut actor = Actor {
            instance: instance.to_owned(),
            options,
            mailbox: mailbox.clone(),
            status: status_tx,
            running: None,
        };
        actor.open().await;
        tokio::spawn(actor.run(inbox));
        Self { mailbox, status }
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

    async fn delete_chat(&self, chat: &ChatJid, delete_media: bool) -> Result<(), SessionError> {
        let (reply, answer) = oneshot::channel();
        let msg = Msg::Delete {
            chat: chat.clone(),
            delete_media,
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
            client,
            handle: bot.spawn(),
            _lock: lock,
        });
    }

    /// Disconnects (flushing the session) within the deadline, then aborts.
    async fn stop_client(&mut self) {
        if let Some(running) = self.running.take() {
            // Dropping the handle when the deadline passes aborts the client.
            let stopped =
                tokio::time::timeout(self.options.shutdown_deadline, running.handle.shutdown())
                    .await;
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
                    reply,
                } => {
                    let result = match &self.running {
                        Some(running) => {
                            delete_on_client(
                                &running.client,
                                &chat,
                                delete_media,
                                self.options.delete_timeout,
                            )
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
