//! Which worker owns which instance when several share the work. Every instance is owned by
//! one live worker at a time through a lease in Redis with a fencing generation; only the owner
//! consumes the instance's queue and holds its WhatsApp session. Each worker heartbeats its
//! membership, renews its leases and computes the same balanced, sticky plan ([`mod@assign`]) from
//! what Redis holds; it takes free leases the plan gives it and hands over (stop consuming,
//! finish or hand back what is in flight, close the session, then release) those it gives up.
//!
//! The lease is the fence every effect checks ([`crate::fence::Lease`]): held until a moment counted on this
//! process's clock from when the renewal was *sent*, so it never outlives Redis's. While Redis
//! does not answer, a worker keeps what it holds until those moments pass, then lets go of it
//! (another worker may own it by then) and claims nothing new.
//!
//! One worker with the embedded store needs none of this: its leases are permanent.

pub mod assign;
mod coordination;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::OwnershipConfig;
use crate::fence::Term;
use crate::instances::{Instance, Instances};
use crate::session::{Opening, SessionState};
use crate::telemetry;
use assign::{Member, assign};
pub use coordination::{Coordination, parse_holder};

/// A session that could not be opened is tried again after this, doubling up to `REOPEN_MAX`,
/// for as long as the lease holds.
const REOPEN_FIRST: Duration = Duration::from_secs(1);
const REOPEN_MAX: Duration = Duration::from_secs(30);
/// Sessions opened at once by one worker (each may wait on the session database's pool).
const OPENING_AT_ONCE: usize = 8;
/// A worker takes nothing until no member has appeared for one tick (every live member
/// heartbeats within one): workers starting together, or rejoining together after Redis lost
/// the members, plan over the same members and open each session once. A worker that starts
/// alone waits three ticks, for others starting a little later.
const SETTLE_TICKS: u32 = 1;
const SETTLE_TICKS_ALONE: u32 = 3;

/// Whether a worker can serve the instances it would hold: its broker connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Consuming now.
    Up,
    /// Lost at this moment, after it had consumed.
    LostAt(Instant),
    /// Never consumed yet.
    Never,
}

impl Link {
    /// Whether to take part in the split: a worker that never reached the broker, or lost it
    /// for longer than a lease, would hold instances it cannot serve.
    fn serves(self, lease: Duration) -> bool {
        match self {
            Link::Up => true,
            Link::LostAt(at) => at.elapsed() < lease,
            Link::Never => false,
        }
    }
}

/// What the worker does when it gains or loses an instance.
#[async_trait::async_trait]
pub trait Host: Send + Sync {
    /// The broker connection the instances would be served on.
    fn link(&self) -> Link {
        Link::Up
    }
    /// The lease is held: open the session, then consume the queue. When the session could
    /// not be opened the queue is left alone (its commands wait there) and the gain is tried
    /// again later.
    async fn gain(&self, instance: &Arc<Instance>) -> Opening;
    /// Stop consuming; `graceful` lets in-flight commands finish within the grace period
    /// (otherwise they go back at once); then close the session.
    async fn lose(&self, instance: &Arc<Instance>, graceful: bool);
}

/// How the coordinator is tuned.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub lease: Duration,
    pub tick: Duration,
    pub capacity: u32,
}

impl Timing {
    pub fn of(config: &OwnershipConfig) -> Self {
        Self {
            lease: Duration::from_millis(config.lease_ms),
            tick: Duration::from_millis(config.tick_ms),
            capacity: config.capacity,
        }
    }
}

/// An instance whose hand-over or loss has finished.
struct Let {
    instance: String,
}

/// Keeps this worker's share of the instances until `stop`, then hands all of it over.
pub async fn coordinate(
    coordination: Coordination,
    timing: Timing,
    instances: Arc<Instances>,
    host: Arc<dyn Host>,
    stop: CancellationToken,
) {
    let mut coordinator = Coordinator {
        names: instances.iter().map(|i| i.name().to_owned()).collect(),
        coordination,
        timing,
        instances,
        host,
        held: BTreeMap::new(),
        letting_go: HashSet::new(),
        plan: None,
        reachable: true,
        turns: HashMap::new(),
        reconnected: HashMap::new(),
        joined_at: None,
        appeared_at: None,
        settle: Duration::ZERO,
        members: HashSet::new(),
        unheld_since: HashMap::new(),
        opening: Arc::new(tokio::sync::Semaphore::new(OPENING_AT_ONCE)),
    };
    let (done, mut finished) = mpsc::unbounded_channel();
    let mut leaving = false;
    loop {
        if !leaving && stop.is_cancelled() {
            leaving = true;
            tracing::info!(
                instances = coordinator.held.len(),
                "Handing every instance over."
            );
        }
        coordinator.tick(leaving, &done).await;
        if leaving && coordinator.held.is_empty() && coordinator.letting_go.is_empty() {
            break;
        }
        // While Redis does not answer, ask more often: every worker sees it back within a
        // fraction of a tick, and the members settle together.
        // So do members settling after members appeared: they take as soon as it is safe.
        let next = match coordinator.reachable && coordinator.is_settled() {
            true => coordinator.timing.tick,
            false => coordinator.timing.tick / 4,
        };
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = stop.cancelled(), if !leaving => {}
            Some(Let { instance }) = finished.recv() => coordinator.let_go(&instance),
        }
        while let Ok(Let { instance }) = finished.try_recv() {
            coordinator.let_go(&instance);
        }
    }
    metrics::gauge!(telemetry::OWNED_INSTANCES).set(0.0);
}

struct Coordinator {
    coordination: Coordination,
    timing: Timing,
    instances: Arc<Instances>,
    names: Vec<String>,
    host: Arc<dyn Host>,
    /// Leases held, with their generation (those being handed over included).
    held: BTreeMap<String, u64>,
    /// Instances being handed over or given up: nothing is taken again until that is done.
    letting_go: HashSet<String>,
    /// This worker's last plan, to count rebalances.
    plan: Option<Vec<String>>,
    reachable: bool,
    /// Per instance: its gains and losses run one at a time, in the order they were started
    /// (a slow session open must not hold up the renewals of every other lease).
    turns: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Per instance: the lease generation under which its replaced session was connected again.
    reconnected: HashMap<String, u64>,
    /// When this worker first joined the members, and when a member (itself included) last
    /// appeared: it takes nothing until `settle` has passed since.
    joined_at: Option<Instant>,
    appeared_at: Option<Instant>,
    settle: Duration,
    /// The members of the last snapshot.
    members: HashSet<String>,
    /// Instances it knows that nobody held, since when (as far as its heartbeats saw).
    unheld_since: HashMap<String, Instant>,
    /// Bounds the sessions opened at once.
    opening: Arc<tokio::sync::Semaphore>,
}

impl Coordinator {
    fn instance(&self, name: &str) -> Arc<Instance> {
        self.instances
            .get(name)
            .expect("plans hold hosted instances only")
            .clone()
    }

    fn turn(&mut self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.turns.entry(name.to_owned()).or_default().clone()
    }

    /// Whether no member appeared for `settle` before `at`.
    fn is_settled_at(&self, at: Instant) -> bool {
        self.appeared_at
            .is_some_and(|appeared| at.duration_since(appeared) >= self.settle)
    }

    fn is_settled(&self) -> bool {
        self.is_settled_at(Instant::now())
    }

    fn let_go(&mut self, name: &str) {
        self.held.remove(name);
        self.letting_go.remove(name);
    }

    async fn tick(&mut self, leaving: bool, done: &mpsc::UnboundedSender<Let>) {
        let asked_at = Instant::now();
        let held: Vec<(&str, u64)> = self.held.iter().map(|(n, g)| (n.as_str(), *g)).collect();
        // Without a broker connection to serve them on, it takes no part in the split.
        let serves = self.host.link().serves(self.timing.lease);
        let capacity = if leaving || !serves {
            0
        } else {
            self.timing.capacity
        };
        let heartbeat =
            self.coordination
                .heartbeat(capacity, self.timing.lease, &held, &self.names);
        let snapshot = match heartbeat.await {
            Ok(snapshot) => snapshot,
            Err(error) => {
                if self.reachable {
                    tracing::warn!(%error, "Redis does not answer: keeping the instances held while their leases last, taking none.");
                }
                self.reachable = false;
                self.give_up_expired(done);
                return;
            }
        };
        self.reachable = true;
        let members_now: HashSet<String> =
            snapshot.members.iter().map(|(id, _)| id.clone()).collect();
        let appeared = members_now.iter().any(|m| !self.members.contains(m));
        if snapshot.joined || appeared {
            let alone = members_now.len() <= 1;
            let ticks = if snapshot.joined && self.joined_at.is_none() && alone {
                SETTLE_TICKS_ALONE
            } else {
                SETTLE_TICKS
            };
            self.settle = (self.timing.tick * ticks).min(self.timing.lease / 2);
            self.appeared_at = Some(asked_at);
            self.joined_at.get_or_insert(asked_at);
        }
        self.members = members_now;
        let until = asked_at + self.timing.lease;
        let renewed: Vec<(String, bool)> = held
            .iter()
            .map(|(n, _)| (*n).to_owned())
            .zip(snapshot.renewed.iter().copied())
            .collect();
        for (name, renewed) in renewed {
            if renewed {
                self.instance(&name).lease().extend(until);
            } else if self.letting_go.contains(&name) {
                // Released by its hand-over a moment ago.
                self.held.remove(&name);
            } else {
                self.lost(&name, "taken", done);
            }
        }
        self.give_up_expired(done);
        self.connect_replaced_again();
        if leaving {
            self.hand_over(self.held.keys().cloned().collect(), done);
            self.report();
            return;
        }

        let members: Vec<Member> = snapshot
            .members
            .iter()
            .map(|(id, capacity)| Member {
                id: id.clone(),
                capacity: *capacity,
            })
            .collect();
        // Plans agree only over what every live member knows; an instance only some know
        // (a rolling deploy that adds one) is left to the next rule.
        let shared: Vec<String> = self
            .names
            .iter()
            .zip(&snapshot.shared)
            .filter(|(_, everyone)| **everyone)
            .map(|(name, _)| name.clone())
            .collect();
        let (mine, unowned): (Vec<String>, HashSet<String>) = {
            let owners: HashMap<&str, &str> = self
                .names
                .iter()
                .zip(&snapshot.holders)
                .filter_map(|(name, holder)| Some((name.as_str(), holder.as_ref()?.0.as_str())))
                .collect();
            let plan = assign(&members, &shared, &owners);
            let mine: Vec<String> = plan
                .get(self.coordination.member())
                .map(|owned| owned.iter().map(|s| (*s).to_owned()).collect())
                .unwrap_or_default();
            let unowned = mine
                .iter()
                .filter(|n| !owners.contains_key(n.as_str()))
                .cloned()
                .collect();
            (mine, unowned)
        };
        let planned: HashSet<&String> = shared.iter().collect();
        // An instance held by nobody for a whole lease is taken by a worker that knows it,
        // one per tick, whatever the plans say.
        for (name, holder) in self.names.iter().zip(&snapshot.holders) {
            if holder.is_some() || self.held.contains_key(name) {
                self.unheld_since.remove(name);
            } else {
                self.unheld_since.entry(name.clone()).or_insert(asked_at);
            }
        }
        let orphan = self
            .unheld_since
            .iter()
            .filter(|(name, since)| {
                asked_at.duration_since(**since) >= self.timing.lease
                    && !self.letting_go.contains(*name)
            })
            .map(|(name, _)| name.clone())
            .min();
        if self.plan.as_ref().is_some_and(|before| *before != mine) {
            metrics::counter!(telemetry::REBALANCES).increment(1);
        }
        let keep: HashSet<&String> = mine.iter().collect();
        let give_up: Vec<String> = self
            .held
            .keys()
            .filter(|n| !keep.contains(n) && (planned.contains(n) || !serves))
            .cloned()
            .collect();
        self.hand_over(give_up, done);
        // Members that just appeared (this one included) may not see each other yet: wait a
        // tick after the last appearance so that every plan counts the same members.
        let settled = self.is_settled_at(asked_at);
        let mut free: Vec<&str> = mine
            .iter()
            .filter(|n| unowned.contains(*n))
            .filter(|n| !self.held.contains_key(*n) && !self.letting_go.contains(*n))
            .map(String::as_str)
            .collect();
        if let Some(orphan) = &orphan
            && !free.contains(&orphan.as_str())
        {
            tracing::info!(instance = %orphan, "Taking an instance nobody held for a lease.");
            free.push(orphan);
        }
        if serves && settled && !free.is_empty() {
            self.take(&free, asked_at).await;
        }
        self.plan = Some(mine);
        self.report();
    }

    /// Takes the free leases the plan gives this worker, then starts serving them.
    async fn take(&mut self, free: &[&str], asked_at: Instant) {
        let acquired = match self.coordination.acquire(self.timing.lease, free).await {
            Ok(acquired) => acquired,
            Err(error) => {
                tracing::warn!(%error, "Could not take instance leases; trying on the next tick.");
                return;
            }
        };
        for (name, acquired) in free.iter().zip(acquired) {
            let Some(acquired) = acquired else { continue };
            let instance = self.instance(name);
            instance.lease().set(Some(Term {
                generation: acquired.generation,
                until: Some(asked_at + self.timing.lease),
            }));
            self.held.insert((*name).to_owned(), acquired.generation);
            self.unheld_since.remove(*name);
            if let Some((gap, released)) = acquired.gap {
                let how = if released { "handover" } else { "failover" };
                metrics::histogram!(telemetry::OWNERSHIP_GAP, "how" => how)
                    .record(gap.as_secs_f64());
            }
            tracing::info!(instance = %name, generation = acquired.generation, "Instance owned.");
            let (host, turn, opening) = (self.host.clone(), self.turn(name), self.opening.clone());
            tokio::spawn(async move {
                let mut wait = REOPEN_FIRST;
                loop {
                    {
                        let _turn = turn.lock().await;
                        // Lost (or lost and taken again) meanwhile: not this gain's.
                        if instance.lease().generation() != Some(acquired.generation) {
                            return;
                        }
                        let _opening = opening.acquire().await;
                        if host.gain(&instance).await == Opening::Done {
                            return;
                        }
                    }
                    tracing::warn!(instance = %instance.name(), retry_in_ms = wait.as_millis() as u64, "Session could not be opened; its commands wait in the queue.");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(REOPEN_MAX);
                }
            });
        }
    }

    /// Hands instances over: stop consuming, let in-flight work finish, close the session,
    /// then release the lease (renewed meanwhile: they stay in `held` until released).
    fn hand_over(&mut self, names: Vec<String>, done: &mpsc::UnboundedSender<Let>) {
        for name in names {
            if !self.letting_go.insert(name.clone()) {
                continue;
            }
            let generation = self.held[&name];
            let instance = self.instance(&name);
            let host = self.host.clone();
            let coordination = self.coordination.clone();
            let done = done.clone();
            let turn = self.turn(&name);
            tokio::spawn(async move {
                let started = Instant::now();
                let _turn = turn.lock().await;
                host.lose(&instance, true).await;
                instance.lease().set(None);
                if let Err(error) = coordination.release(&name, generation).await {
                    tracing::warn!(%error, instance = %name, "Could not release the lease; it expires by itself.");
                }
                metrics::histogram!(telemetry::HANDOVER_DURATION)
                    .record(started.elapsed().as_secs_f64());
                tracing::info!(instance = %name, "Instance handed over.");
                let _ = done.send(Let { instance: name });
            });
        }
    }

    /// A session replaced while this worker holds its lease was replaced by a worker that lost
    /// the lease without knowing yet: paused between its lease check and its connect, which
    /// WhatsApp does not fence, or between asking the session database for an opening and
    /// getting it (the database then refuses the owner's writes). The owner connects again. Once per lease: a client that
    /// replaces it again is not one of ours, and two clients taking turns is the "replaced"
    /// loop operators dread; that session stays `replaced` for the operator.
    fn connect_replaced_again(&mut self) {
        let replaced: Vec<(String, u64)> = self
            .held
            .iter()
            .filter(|(name, generation)| {
                !self.letting_go.contains(*name)
                    && self.reconnected.get(*name) != Some(generation)
                    && self.instance(name).session().state() == SessionState::Replaced
            })
            .map(|(name, generation)| (name.clone(), *generation))
            .collect();
        for (name, generation) in replaced {
            self.reconnected.insert(name.clone(), generation);
            let instance = self.instance(&name);
            let turn = self.turn(&name);
            tokio::spawn(async move {
                let mut wait = REOPEN_FIRST;
                let mut first = true;
                // A reconnect that fails is tried again, as a gain is, while the lease holds.
                loop {
                    {
                        let _turn = turn.lock().await;
                        let session = instance.session();
                        if instance.lease().generation() != Some(generation) {
                            return;
                        }
                        if first {
                            if session.state() != SessionState::Replaced {
                                return;
                            }
                            metrics::counter!(telemetry::SESSIONS_RECONNECTED).increment(1);
                            tracing::warn!(instance = %instance.name(), "Another client took over the session while this worker holds the instance; connecting again.");
                            session.close().await;
                            first = false;
                        }
                        if session.open().await == Opening::Done {
                            return;
                        }
                    }
                    tracing::warn!(instance = %instance.name(), retry_in_ms = wait.as_millis() as u64, "Session could not be connected again; trying again.");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(REOPEN_MAX);
                }
            });
        }
    }

    /// Leases whose term passed without a renewal are lost.
    fn give_up_expired(&mut self, done: &mpsc::UnboundedSender<Let>) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .held
            .keys()
            .filter(|n| self.instance(n).lease().expired(now))
            .cloned()
            .collect();
        for name in expired {
            self.lost(&name, "expired", done);
        }
    }

    /// Someone else may own it now: fence it, stop at once, close the session.
    fn lost(&mut self, name: &str, reason: &'static str, done: &mpsc::UnboundedSender<Let>) {
        let instance = self.instance(name);
        instance.lease().set(None);
        self.held.remove(name);
        metrics::counter!(telemetry::LEASES_LOST, "reason" => reason).increment(1);
        tracing::warn!(instance = %name, reason, "Lease on the instance lost; stopping its work.");
        if !self.letting_go.insert(name.to_owned()) {
            return;
        }
        let host = self.host.clone();
        let done = done.clone();
        let turn = self.turn(name);
        tokio::spawn(async move {
            let _turn = turn.lock().await;
            host.lose(&instance, false).await;
            let _ = done.send(Let {
                instance: instance.name().to_owned(),
            });
        });
    }

    fn report(&self) {
        let serving = self.held.len()
            - self
                .letting_go
                .iter()
                .filter(|n| self.held.contains_key(*n))
                .count();
        metrics::gauge!(telemetry::OWNED_INSTANCES).set(serving as f64);
    }
}
