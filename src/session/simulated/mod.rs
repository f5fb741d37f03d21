//! A scripted in-process session. It never talks to WhatsApp: it is for trying the worker
//! without a phone, for tests and for benchmarks.

use std::io::Write;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::config::{SimulatedConfig, SimulatedFailure};
use crate::contract::ChatJid;
use crate::contract::ChatKnown;
use crate::fence::Lease;
use crate::fence::{Fence, Fenced};
use crate::telemetry::traces::{self, Kind};

use super::postgres::{PgSessions, PgStore};
use super::{ChatSession, Deleted, Opening, SessionError, SessionState};

pub struct SimulatedSession {
    inner: Arc<Inner>,
}

/// What the session and its detached effects share.
pub struct Inner {
    connected: bool,
    /// The effect runs on a task of its own once its turn comes, as the real session's actor
    /// sends a delete: a command dropped meanwhile does not stop it.
    detached: bool,
    latency: Duration,
    failures_left: AtomicU32,
    failure: SimulatedFailure,
    deletes: AtomicU64,
    effects_log: Option<Mutex<std::fs::File>>,
    connected_flag_file: Option<std::path::PathBuf>,
    resolve: std::collections::BTreeMap<String, ChatJid>,
    chat_list: Option<std::collections::BTreeSet<String>>,
    world: Option<World>,
    shared: Option<Shared>,
    /// With several workers: connecting is an effect, made only while this lease holds.
    owner: Option<Arc<Lease>>,
}

impl Deref for SimulatedSession {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.inner
    }
}

/// A simulated session kept in the shared session store: opened as the lease's generation,
/// and every delete first records itself there, so the database refuses a stale owner's.
struct Shared {
    instance: String,
    sessions: PgSessions,
    held: tokio::sync::Mutex<Option<PgStore>>,
    /// The held opening had a write refused (see [`PgStore::superseded`]).
    superseded: AtomicBool,
}

/// A stand-in for WhatsApp's servers shared by every worker: a folder where each instance's
/// file names the client connected to it. Opening a session replaces whichever client was
/// connected (as WhatsApp does, and `replaced.log` says so); a delete from a client that is
/// not the connected one is refused, and written to `overlaps.log` (two sessions acting for
/// one instance) unless it was under way before the replacement ([`World::admits`]).
struct World {
    dir: std::path::PathBuf,
    instance: String,
    /// This client, while its session is open.
    client: Mutex<Option<String>>,
}

impl World {
    fn holder_file(&self) -> std::path::PathBuf {
        self.dir.join(format!("{}.holder", self.instance))
    }

    fn client(&self) -> Option<String> {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn log(&self, file: &str, line: &str) {
        let now = chrono::Utc::now().timestamp_micros();
        let logged = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(file))
            .and_then(|mut f| append_line(&mut f, &format!("{now} {} {line}", self.instance)));
        if let Err(error) = logged {
            tracing::warn!(%error, "Could not write to the simulated world's log.");
        }
    }

    fn open(&self) -> std::io::Result<()> {
        let client = uuid::Uuid::new_v4().simple().to_string();
        if let Ok(previous) = std::fs::read_to_string(self.holder_file()) {
            self.log("replaced.log", &format!("{previous} by {client}"));
        }
        let tmp = self.dir.join(format!("{}.{client}.tmp", self.instance));
        std::fs::write(&tmp, &client)?;
        std::fs::rename(&tmp, self.holder_file())?;
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(client);
        Ok(())
    }

    fn close(&self) {
        let Some(client) = self.client.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        if std::fs::read_to_string(self.holder_file()).is_ok_and(|holder| holder == client) {
            let _ = std::fs::remove_file(self.holder_file());
        }
    }

    /// Whether this client is open but another one connected since.
    fn was_replaced(&self) -> bool {
        self.client().is_some_and(|client| {
            std::fs::read_to_string(self.holder_file()).map_or(true, |holder| holder != client)
        })
    }

    /// Whether this client may act: it is the connected one. A replaced client is refused,
    /// as WhatsApp refuses it. If its fence was checked after it was replaced, the worker's
    /// fencing failed: an overlap. If before, the act was already under way when the next
    /// owner connected (a pause between check and act that no client-side check can close):
    /// refused at the resource, logged to `refused.log`.
    /// A refused client whose worker still holds the lease is the owner, knocked out by a
    /// worker that connected after its own lease ended (that connect is the overlap).
    fn admits(&self, fence_checked_at: i64, owner: bool) -> Result<(), SessionError> {
        let Some(client) = self.client() else {
            return Err(SessionError::NotConnected);
        };
        let holder = std::fs::read_to_string(self.holder_file()).unwrap_or_default();
        if holder == client {
            return Ok(());
        }
        let under_way = owner
            || self
                .replaced_at(&client)
                .is_some_and(|replaced_at| fence_checked_at <= replaced_at);
        let log = if under_way {
            "refused.log"
        } else {
            "overlaps.log"
        };
        self.log(log, &format!("{client} acted while {holder} was connected"));
        Err(SessionError::NotConnected)
    }

    /// When `client` was replaced (µs), from `replaced.log`.
    fn replaced_at(&self, client: &str) -> Option<i64> {
        let text = std::fs::read_to_string(self.dir.join("replaced.log")).ok()?;
        let replaced = format!(" {} {client} by ", self.instance);
        text.lines()
            .find_map(|line| line.split_once(&replaced)?.0.parse().ok())
    }
}

impl SimulatedSession {
    /// Whether the scripted chat list holds the chat, under the key given or the one it
    /// resolves to.
    fn known(&self, chat: &ChatJid) -> ChatKnown {
        let Some(list) = &self.chat_list else {
            return ChatKnown::Unknown;
        };
        let resolved = self.resolve.get(chat.user()).unwrap_or(chat);
        if list.contains(chat.as_str()) || list.contains(resolved.as_str()) {
            ChatKnown::True
        } else {
            ChatKnown::False
        }
    }

    pub fn new(instance: &str, cfg: &SimulatedConfig) -> std::io::Result<Self> {
        let world = match &cfg.world_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                Some(World {
                    dir: dir.clone(),
                    instance: instance.to_owned(),
                    client: Mutex::new(None),
                })
            }
            None => None,
        };
        let effects_log = match &cfg.effects_log {
            Some(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                Some(Mutex::new(file))
            }
            None => None,
        };
        let inner = Inner {
            connected: cfg.connected,
            detached: cfg.detached_effects,
            latency: Duration::from_millis(cfg.latency_ms),
            failures_left: AtomicU32::new(cfg.fail_first),
            failure: cfg.failure,
            deletes: AtomicU64::new(0),
            effects_log,
            connected_flag_file: cfg.connected_flag_file.clone(),
            resolve: cfg.resolve.clone(),
            chat_list: cfg.chat_list.clone(),
            world,
            shared: None,
            owner: None,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    fn building(&mut self) -> &mut Inner {
        Arc::get_mut(&mut self.inner).expect("configured before use")
    }

    /// Opens only while `lease` holds (several workers share the instances).
    pub fn owned_through(mut self, lease: Arc<Lease>) -> Self {
        self.building().owner = Some(lease);
        self
    }

    /// Keeps the session in the shared store, opened as the owner's lease generation.
    pub fn in_database(mut self, instance: &str, sessions: PgSessions) -> Self {
        self.building().shared = Some(Shared {
            instance: instance.to_owned(),
            sessions,
            held: Default::default(),
            superseded: AtomicBool::new(false),
        });
        self
    }
}

impl Inner {
    /// Deletes performed so far.
    pub fn deletes(&self) -> u64 {
        self.deletes.load(Ordering::Relaxed)
    }

    fn is_connected(&self) -> bool {
        if self.world.as_ref().is_some_and(|w| w.client().is_none()) {
            return false;
        }
        match &self.connected_flag_file {
            Some(flag) => flag.exists(),
            None => self.connected,
        }
    }

    /// Logs one delete: when it happened (µs), the chat, and the mutation's time (the command's
    /// first-seen ms): the same chat with two mutation times is a repeat that deletes more.
    fn record(&self, chat: &ChatJid, seen_ms: u64) -> Result<(), SessionError> {
        self.deletes.fetch_add(1, Ordering::Relaxed);
        if let Some(log) = &self.effects_log {
            let now = chrono::Utc::now().timestamp_micros();
            let mut file = log.lock().unwrap_or_else(|e| e.into_inner());
            // Durable before the delete counts as done: the crash harness reads this log.
            append_line(&mut *file, &format!("{now} {chat} {seen_ms}"))
                .and_then(|()| file.sync_data())
                .map_err(|e| SessionError::Server(format!("effects log: {}", e.kind())))?;
        }
        Ok(())
    }
}

/// Appends `line` in one write: a process killed between the pieces `writeln!` writes one by
/// one would leave a torn line that the next one runs into (the harnesses read these logs).
fn append_line(file: &mut impl Write, line: &str) -> std::io::Result<()> {
    file.write_all(format!("{line}\n").as_bytes())
}

impl Inner {
    /// The fence check, then (after `sending`) the effect as the world admits it.
    async fn act(
        &self,
        chat: &ChatJid,
        lookup: bool,
        seen_ms: u64,
        fence: &dyn Fence,
        sending: Duration,
    ) -> Result<ChatJid, SessionError> {
        let fence_checked_at = chrono::Utc::now().timestamp_micros();
        fence.check().map_err(SessionError::Fenced)?;
        if !self.is_connected() {
            return Err(SessionError::NotConnected);
        }
        if !sending.is_zero() {
            tokio::time::sleep(sending).await;
        }
        if let Some(world) = &self.world {
            let owner = self
                .owner
                .as_ref()
                .is_some_and(|l| l.generation().is_some());
            world.admits(fence_checked_at, owner)?;
        }
        if let Some(shared) = &self.shared {
            let held = shared.held.lock().await;
            let store = held.as_ref().ok_or(SessionError::NotConnected)?;
            if store
                .note("last-delete", chat.as_str().as_bytes())
                .await
                .is_err()
            {
                shared
                    .superseded
                    .store(store.superseded(), Ordering::Relaxed);
                return Err(SessionError::Fenced(Fenced(
                    "the session store refused the write: another owner opened the session",
                )));
            }
        }
        let fail = self
            .failures_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        // Resolution as scripted; a number not in the script is its own chat.
        let chat = traces::stage_now("resolve", Kind::Internal, || {
            match self.resolve.get(chat.user()) {
                Some(scripted) if lookup => scripted,
                _ => chat,
            }
        });
        if fail {
            return Err(match self.failure {
                SimulatedFailure::NotConnected => SessionError::NotConnected,
                SimulatedFailure::Timeout => SessionError::Timeout,
                SimulatedFailure::ServerError => {
                    SessionError::Server("simulated server error".into())
                }
                SimulatedFailure::Rejected => SessionError::Rejected("simulated rejection".into()),
                // The delete was applied; its answer did not come back in time.
                SimulatedFailure::TimeoutAfterEffect => {
                    self.record(chat, seen_ms)?;
                    SessionError::Timeout
                }
            });
        }
        self.record(chat, seen_ms)?;
        Ok(chat.clone())
    }
}

#[async_trait::async_trait]
impl ChatSession for SimulatedSession {
    fn state(&self) -> SessionState {
        let superseded = |s: &Shared| s.superseded.load(Ordering::Relaxed);
        if self.world.as_ref().is_some_and(World::was_replaced)
            || self.shared.as_ref().is_some_and(superseded)
        {
            SessionState::Replaced
        } else if self.is_connected() {
            SessionState::Connected
        } else {
            SessionState::NotPaired
        }
    }

    async fn delete_chat_as_of(
        &self,
        chat: &ChatJid,
        lookup: bool,
        seen_ms: u64,
        fence: Arc<dyn Fence>,
    ) -> Result<Deleted, SessionError> {
        // What the chat list knew before the delete changes it.
        let known = self.known(chat);
        let deleted = |chat| Deleted { chat, known };
        if !self.detached {
            // The latency stands for the wait in the session and the call itself; the effect,
            // and the fence check just before it, come at its end.
            if !self.latency.is_zero() {
                tokio::time::sleep(self.latency).await;
            }
            let acted = self.act(chat, lookup, seen_ms, &*fence, Duration::ZERO);
            return acted.await.map(deleted);
        }
        // As the real session's actor: the delete waits for its turn (half the latency), is
        // skipped if its requester has gone by then, else checks its fence and is sent (the
        // other half) on a task of its own, whatever becomes of the requester.
        let (reply, answer) = oneshot::channel();
        let (inner, chat) = (self.inner.clone(), chat.clone());
        let trace = traces::carry();
        tokio::spawn(traces::within(trace, async move {
            let turn = inner.latency / 2;
            tokio::time::sleep(turn).await;
            if reply.is_closed() {
                return;
            }
            let sending = inner.latency - turn;
            let acted = inner.act(&chat, lookup, seen_ms, &*fence, sending).await;
            let _ = reply.send(acted);
        }));
        let acted = answer.await.unwrap_or(Err(SessionError::NotConnected));
        acted.map(deleted)
    }

    async fn open(&self) -> Opening {
        let generation = match &self.owner {
            Some(lease) => match lease.generation() {
                Some(generation) => Some(generation),
                None => return Opening::Done,
            },
            None => None,
        };
        if let Some(shared) = &self.shared {
            match shared.sessions.open(&shared.instance, generation).await {
                Ok(store) => {
                    *shared.held.lock().await = Some(store);
                    shared.superseded.store(false, Ordering::Relaxed);
                }
                Err(error) => {
                    tracing::warn!(%error, "Could not open the shared session.");
                    return Opening::Failed;
                }
            }
        }
        // Connecting replaces whichever client is connected: a lease that ended while the
        // store was being opened must not knock out the instance's new owner.
        if self
            .owner
            .as_ref()
            .is_some_and(|l| l.generation() != generation)
        {
            self.close().await;
            return Opening::Done;
        }
        if let Some(world) = &self.world {
            if let Err(error) = world.open() {
                tracing::warn!(%error, "Could not connect to the simulated world.");
                return Opening::Failed;
            }
            // Paused between the check above and the connect, past the lease: the connect
            // replaced the owner's client (WhatsApp does not fence connects). Let go at once;
            // the owner connects again. The world counts it apart from overlaps (deletes).
            if self
                .owner
                .as_ref()
                .is_some_and(|l| l.generation() != generation)
            {
                let client = world.client().unwrap_or_default();
                world.log(
                    "stale-connects.log",
                    &format!("{client} connected after its lease ended"),
                );
                self.close().await;
            }
        }
        Opening::Done
    }

    async fn close(&self) {
        if let Some(world) = &self.world {
            world.close();
        }
        if let Some(shared) = &self.shared {
            *shared.held.lock().await = None;
        }
    }
}

#[cfg(test)]
mod tests;
