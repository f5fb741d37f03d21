//! Several workers sharing the instances, on the real Redis and RabbitMQ: a balanced, sticky
//! split; joins and leaves that move only what they must; failover after a worker dies without
//! a word; what a worker does while Redis does not answer; and whole workers handing instances
//! over without a 503 or a second session, or handing back what a pause caught under way.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_delete_worker::config::{Config, SimulatedConfig};
use chat_delete_worker::contract::{ChatJid, normalise_number};
use chat_delete_worker::fence::{Fence, Unfenced};
use chat_delete_worker::instances::{Instance, Instances};
use chat_delete_worker::ownership::{self, Coordination, Host, Timing};
use chat_delete_worker::session::{ChatSession, Opening, SessionError, SimulatedSession};
use common::redis::PrivateRedis;
use common::*;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "secret-tok-scale";
const LOCAL_REDIS: &str = "redis://127.0.0.1:6379";

fn instances_toml(n: usize, world: &Path, extra: &str) -> String {
    (0..n)
        .map(|i| {
            format!(
                "[instances.inst{i:02}]\ntoken_sha256 = \"{}\"\nkind = \"simulated\"\nsimulated = {{ world_dir = \"{}\"{extra} }}\n",
                hash(TOKEN),
                world.display()
            )
        })
        .collect()
}

/// The instances of one worker, with ownership on (sessions closed, leases vacant).
async fn instances(n: usize, world: &Path) -> Arc<Instances> {
    instances_with(n, world, "").await
}

/// The same, with `sections` added to the config (where sessions are kept, say).
async fn instances_with(n: usize, world: &Path, sections: &str) -> Arc<Instances> {
    instances_in("x", n, world, sections).await
}

/// The same, in the deployment (broker namespace) `namespace`.
async fn instances_in(namespace: &str, n: usize, world: &Path, sections: &str) -> Arc<Instances> {
    let toml = format!(
        "[broker]\nnamespace = \"{namespace}\"\n[idempotency]\nbackend = \"redis\"\n[ownership]\nenabled = true\n{sections}{}",
        instances_toml(n, world, "")
    );
    let config = Config::from_toml(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    Arc::new(Instances::from_config(&config).await.unwrap())
}

/// Who the hosts say owns what, shared by every coordinator of a test; a gain while another
/// member serves the instance is an overlap.
#[derive(Default)]
struct Ledger {
    serving: Mutex<BTreeMap<String, String>>,
    overlaps: Mutex<Vec<String>>,
    abrupt_losses: Mutex<Vec<String>>,
    /// Gains whose lease had ended by the time the session was open.
    late_opens: Mutex<Vec<String>>,
    failed_opens: Mutex<Vec<String>>,
    /// Every gain that opened a session, in order.
    gains: Mutex<Vec<String>>,
}

impl Ledger {
    fn owners(&self) -> BTreeMap<String, String> {
        self.serving.lock().unwrap().clone()
    }

    fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for member in self.owners().values() {
            *counts.entry(member.clone()).or_default() += 1;
        }
        counts
    }
}

struct RecordingHost {
    member: String,
    ledger: Arc<Ledger>,
    /// An instance whose session takes this long to open (a database that makes it wait).
    slow_open: Option<(String, Duration)>,
    /// An instance whose session fails to open this many times (a database that is down).
    failing_open: Option<(String, AtomicU32)>,
}

#[async_trait::async_trait]
impl Host for RecordingHost {
    async fn gain(&self, instance: &Arc<Instance>) -> Opening {
        if let Some((failing, left)) = &self.failing_open
            && failing == instance.name()
            && left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            self.ledger
                .failed_opens
                .lock()
                .unwrap()
                .push(instance.name().to_owned());
            return Opening::Failed;
        }
        if let Some((slow, delay)) = &self.slow_open
            && slow == instance.name()
        {
            tokio::time::sleep(*delay).await;
        }
        instance.session().open().await;
        self.ledger
            .gains
            .lock()
            .unwrap()
            .push(instance.name().to_owned());
        if instance.lease().check().is_err() {
            self.ledger
                .late_opens
                .lock()
                .unwrap()
                .push(instance.name().to_owned());
        }
        let previous = self
            .ledger
            .serving
            .lock()
            .unwrap()
            .insert(instance.name().to_owned(), self.member.clone());
        if let Some(previous) = previous {
            self.ledger.overlaps.lock().unwrap().push(format!(
                "{} gained while {previous} served it",
                instance.name()
            ));
        }
        Opening::Done
    }

    async fn lose(&self, instance: &Arc<Instance>, graceful: bool) {
        {
            let mut serving = self.ledger.serving.lock().unwrap();
            if serving.get(instance.name()) == Some(&self.member) {
                serving.remove(instance.name());
            }
        }
        if !graceful {
            self.ledger.abrupt_losses.lock().unwrap().push(format!(
                "{}:{}",
                self.member,
                instance.name()
            ));
        }
        instance.session().close().await;
    }
}

struct Member {
    instances: Arc<Instances>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn join(
    redis_url: &str,
    prefix: &str,
    name: &str,
    n: usize,
    world: &Path,
    ledger: &Arc<Ledger>,
    capacity: u32,
) -> Member {
    let instances = instances(n, world).await;
    join_troubled(
        redis_url, prefix, name, instances, ledger, capacity, None, None,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn join_troubled(
    redis_url: &str,
    prefix: &str,
    name: &str,
    instances: Arc<Instances>,
    ledger: &Arc<Ledger>,
    capacity: u32,
    slow_open: Option<(String, Duration)>,
    failing_open: Option<(String, u32)>,
) -> Member {
    let coordination = Coordination::connect(redis_url, prefix, name)
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let host = Arc::new(RecordingHost {
        member: name.to_owned(),
        ledger: ledger.clone(),
        slow_open,
        failing_open: failing_open.map(|(name, n)| (name, AtomicU32::new(n))),
    });
    let timing = Timing {
        lease: Duration::from_millis(1_500),
        tick: Duration::from_millis(100),
        capacity,
    };
    let task = tokio::spawn(ownership::coordinate(
        coordination,
        timing,
        instances.clone(),
        host,
        stop.clone(),
    ));
    Member {
        instances,
        stop,
        task,
    }
}

/// `inst00` once the only member, `a`, serves it.
async fn serving_inst00(ledger: &Ledger, a: &Member) -> Arc<Instance> {
    wait_for("a serves inst00", || {
        ledger.owners().get("inst00").map(String::as_str) == Some("a")
    })
    .await;
    a.instances.get("inst00").unwrap().clone()
}

/// A delete on the instance's session, fenced by its lease as a command's would be.
async fn delete_as_owner(instance: &Instance, chat: &ChatJid) -> Result<ChatJid, SessionError> {
    let lease = instance.lease().clone();
    instance.session().delete_chat(chat, false, lease).await
}

/// Waits until `condition` holds, failing the test after `WAIT`.
async fn until<F>(what: &str, condition: impl Fn() -> F)
where
    F: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn balanced(ledger: &Ledger, members: &[&str], n: usize) -> bool {
    let counts = ledger.counts();
    let owned: usize = counts.values().sum();
    let each: Vec<usize> = members
        .iter()
        .map(|m| counts.get(*m).copied().unwrap_or(0))
        .collect();
    owned == n
        && counts.keys().all(|m| members.contains(&m.as_str()))
        && each.iter().max().unwrap() - each.iter().min().unwrap() <= 1
}

fn prefix(test: &str) -> String {
    format!("test:own:{test}:{}:", uuid::Uuid::new_v4().simple())
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn instances_split_evenly_and_a_join_or_a_leave_moves_only_what_it_must() {
    let world = tempfile::tempdir().unwrap();
    let prefix = prefix("split");
    let ledger = Arc::new(Ledger::default());
    let n = 12;
    let mut members = vec![];
    for name in ["a", "b", "c"] {
        members.push(join(LOCAL_REDIS, &prefix, name, n, world.path(), &ledger, 1).await);
    }
    wait_for("three members hold 4 each", || {
        balanced(&ledger, &["a", "b", "c"], n)
    })
    .await;
    let before = ledger.owners();

    members.push(join(LOCAL_REDIS, &prefix, "d", n, world.path(), &ledger, 1).await);
    wait_for("four members hold 3 each", || {
        balanced(&ledger, &["a", "b", "c", "d"], n)
    })
    .await;
    let after_join = ledger.owners();
    let moved: Vec<&String> = before
        .keys()
        .filter(|i| before[*i] != after_join[*i])
        .collect();
    assert_eq!(moved.len(), 3, "a join moves only the newcomer's share");
    assert!(moved.iter().all(|i| after_join[*i] == "d"));

    // "b" leaves gracefully: it closes its sessions and releases its leases.
    let b = members.remove(1);
    b.stop.cancel();
    tokio::time::timeout(WAIT, b.task).await.unwrap().unwrap();
    assert!(b.instances.iter().all(|i| i.lease().check().is_err()));
    wait_for("three members hold 4 each again", || {
        balanced(&ledger, &["a", "c", "d"], n)
    })
    .await;
    let after_leave = ledger.owners();
    for (instance, owner) in &after_join {
        if owner != "b" {
            assert_eq!(&after_leave[instance], owner, "{instance} moved");
        }
    }
    // Each instance's holder file names one client: nobody was replaced while serving.
    assert!(ledger.overlaps.lock().unwrap().is_empty());
    assert!(lines(&world.path().join("overlaps.log")).is_empty());
    assert!(ledger.abrupt_losses.lock().unwrap().is_empty());
    for m in members {
        m.stop.cancel();
        tokio::time::timeout(WAIT, m.task).await.unwrap().unwrap();
    }
    assert!(ledger.owners().is_empty(), "every instance handed back");
}

/// Found by the cluster harness: a session open that waited on the database longer than the
/// lease held up the coordinator, so every lease of the worker ran out; another worker took
/// them, and the slow open then connected anyway, knocking out the new owner's session.
#[tokio::test]
async fn a_slow_session_open_neither_holds_up_other_leases_nor_connects_after_its_lease_ended() {
    let world = tempfile::tempdir().unwrap();
    let prefix = prefix("slow-open");
    let ledger = Arc::new(Ledger::default());
    let n = 4;
    // Opening inst00 takes twice the lease (1.5 s).
    let slow = Some(("inst00".to_owned(), Duration::from_secs(3)));
    let a = join_troubled(
        LOCAL_REDIS,
        &prefix,
        "a",
        instances(n, world.path()).await,
        &ledger,
        1,
        slow,
        None,
    )
    .await;
    wait_for("a serves every instance", || {
        ledger.counts().get("a") == Some(&n)
    })
    .await;
    assert!(
        ledger.late_opens.lock().unwrap().is_empty(),
        "leases ran out while a session opened: {:?}",
        ledger.late_opens.lock().unwrap()
    );
    assert!(lines(&world.path().join("overlaps.log")).is_empty());
    a.stop.cancel();
    tokio::time::timeout(WAIT, a.task).await.unwrap().unwrap();

    // A session whose lease is not held (ended, or never taken) does not connect.
    let stale = instances(1, world.path()).await;
    let stale = stale.get("inst00").unwrap();
    assert!(stale.lease().check().is_err());
    stale.session().open().await;
    assert!(
        !world.path().join("inst00.holder").exists(),
        "a session without its lease connected"
    );
}

/// A session that could not be opened (its database down) is opened again while the lease
/// holds, rather than left closed until the instance moves.
#[tokio::test]
async fn a_session_that_failed_to_open_is_opened_again_while_the_lease_holds() {
    let world = tempfile::tempdir().unwrap();
    let prefix = prefix("reopen");
    let ledger = Arc::new(Ledger::default());
    let failing = Some(("inst01".to_owned(), 2));
    let a = join_troubled(
        LOCAL_REDIS,
        &prefix,
        "a",
        instances(2, world.path()).await,
        &ledger,
        1,
        None,
        failing,
    )
    .await;
    wait_for("a serves both instances", || {
        ledger.counts().get("a") == Some(&2)
    })
    .await;
    assert_eq!(ledger.failed_opens.lock().unwrap().len(), 2);
    assert!(ledger.abrupt_losses.lock().unwrap().is_empty());
    a.stop.cancel();
    tokio::time::timeout(WAIT, a.task).await.unwrap().unwrap();

    // What a session answers when its database is down: tried again, not left closed.
    use chat_delete_worker::session::postgres::PgSessions;
    use chat_delete_worker::session::{ChatSession, SimulatedSession};
    let unreachable = PgSessions::new("postgres://postgres@127.0.0.1:1/none").unwrap();
    let session = SimulatedSession::new("inst00", &Default::default())
        .unwrap()
        .in_database("inst00", unreachable);
    assert_eq!(session.open().await, Opening::Failed);
}

#[tokio::test]
async fn capacity_weights_the_split() {
    let world = tempfile::tempdir().unwrap();
    let prefix = prefix("capacity");
    let ledger = Arc::new(Ledger::default());
    let big = join(LOCAL_REDIS, &prefix, "big", 12, world.path(), &ledger, 3).await;
    let small = join(LOCAL_REDIS, &prefix, "small", 12, world.path(), &ledger, 1).await;
    wait_for("9 and 3", || {
        let counts = ledger.counts();
        counts.get("big") == Some(&9) && counts.get("small") == Some(&3)
    })
    .await;
    for m in [big, small] {
        m.stop.cancel();
        tokio::time::timeout(WAIT, m.task).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_dead_worker_s_instances_fail_over_and_its_stale_leases_refuse_every_effect() {
    let world = tempfile::tempdir().unwrap();
    let prefix = prefix("failover");
    let ledger = Arc::new(Ledger::default());
    let n = 8;
    let a = join(LOCAL_REDIS, &prefix, "a", n, world.path(), &ledger, 1).await;
    let b = join(LOCAL_REDIS, &prefix, "b", n, world.path(), &ledger, 1).await;
    wait_for("two members hold 4 each", || {
        balanced(&ledger, &["a", "b"], n)
    })
    .await;
    let generations: HashMap<String, u64> = b
        .instances
        .iter()
        .filter_map(|i| Some((i.name().to_owned(), i.lease().generation()?)))
        .collect();
    assert_eq!(generations.len(), 4);

    // "b" dies without a word: no hand-over, no release, its sessions stay "open".
    b.task.abort();
    let _ = b.task.await;
    ledger
        .serving
        .lock()
        .unwrap()
        .retain(|_, owner| owner != "b");
    wait_for("a holds everything", || {
        ledger.counts().get("a") == Some(&n)
    })
    .await;
    for (name, old) in &generations {
        let instance = a.instances.get(name).unwrap();
        assert!(instance.lease().generation().unwrap() > *old);
        // Had "b" merely been paused, it could not act on its old lease.
        let stale = b.instances.get(name).unwrap();
        assert!(stale.lease().check().is_err(), "{name}: stale lease admits");
        assert!(
            stale
                .session()
                .delete_chat(
                    &normalise_number("5511999999999").unwrap(),
                    false,
                    stale.lease().clone()
                )
                .await
                .is_err()
        );
    }
    assert!(lines(&world.path().join("overlaps.log")).is_empty());
    // The new owner's session replaced the dead one's, as WhatsApp does.
    assert_eq!(lines(&world.path().join("replaced.log")).len(), 4);
    a.stop.cancel();
    tokio::time::timeout(WAIT, a.task).await.unwrap().unwrap();
}

/// A worker paused in the middle of connecting an instance it had just taken (after its lease
/// check) wakes after the next owner connected and completes its connect: WhatsApp lets the
/// newer connection replace the owner's. The owner, still holding the lease, connects again.
#[tokio::test]
async fn an_owner_whose_client_a_stale_connect_replaced_connects_again() {
    let world = tempfile::tempdir().unwrap();
    let prefix = prefix("stale-connect");
    let ledger = Arc::new(Ledger::default());
    let a = join(LOCAL_REDIS, &prefix, "a", 1, world.path(), &ledger, 1).await;
    let instance = serving_inst00(&ledger, &a).await;
    let chat = normalise_number("5511999999999").unwrap();
    let delete = || delete_as_owner(&instance, &chat);
    assert!(delete().await.is_ok());

    // The paused worker's connect completes: a client without the lease replaces a's.
    let stale = SimulatedSession::new(
        "inst00",
        &SimulatedConfig {
            world_dir: Some(world.path().to_owned()),
            ..Default::default()
        },
    )
    .unwrap();
    stale.open().await;
    assert!(delete().await.is_err(), "the replaced client was admitted");

    until("the owner deletes again", || async {
        delete().await.is_ok()
    })
    .await;
    assert!(
        stale
            .delete_chat(&chat, false, Arc::new(Unfenced))
            .await
            .is_err()
    );
    // The owner's refused deletes are not overlaps; the stale client's late delete is.
    assert!(!lines(&world.path().join("refused.log")).is_empty());
    assert_eq!(lines(&world.path().join("overlaps.log")).len(), 1);
    a.stop.cancel();
    tokio::time::timeout(WAIT, a.task).await.unwrap().unwrap();
}

/// Found by the cluster harness: a worker that had just taken an instance was paused while
/// its session open waited for a database connection; the open reached the database after
/// the next owner's, so the database refused every write of the owner's (its deletes handed
/// back, round and round the retry queue, for minutes). The owner, still holding the lease,
/// opens the session again, which fences the stale opening out instead.
#[tokio::test]
async fn an_owner_whose_session_a_stale_open_superseded_opens_it_again() {
    use chat_delete_worker::session::postgres::PgSessions;

    let world = tempfile::tempdir().unwrap();
    let prefix = prefix("stale-open");
    let ledger = Arc::new(Ledger::default());
    let url = std::env::var("CDW_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let sessions = format!("[sessions]\nstore = \"postgres\"\npostgres_url = \"{url}\"\n");
    let instances = instances_with(1, world.path(), &sessions).await;
    let a = join_troubled(LOCAL_REDIS, &prefix, "a", instances, &ledger, 1, None, None).await;
    let instance = serving_inst00(&ledger, &a).await;
    let chat = normalise_number("5511999999999").unwrap();
    let delete = || delete_as_owner(&instance, &chat);
    assert!(delete().await.is_ok());

    // The paused worker's open lands: the database now refuses the owner's writes.
    let generation = instance.lease().generation();
    let stale = PgSessions::connect(&url)
        .await
        .unwrap()
        .in_namespace("x")
        .open("inst00", generation)
        .await
        .unwrap();
    assert!(delete().await.is_err(), "a superseded opening wrote");

    until("the owner deletes again", || async {
        delete().await.is_ok()
    })
    .await;
    assert!(stale.note("late", b"write").await.is_err());
    assert!(stale.superseded());
    a.stop.cancel();
    tokio::time::timeout(WAIT, a.task).await.unwrap().unwrap();
}

/// Defect (found by review): each worker planned over its own configured instance list, so
/// during a rolling deploy that adds an instance the two plans disagreed and one of the
/// instances both know was held by nobody for as long as the lists differed.
#[tokio::test]
async fn workers_whose_instance_lists_differ_leave_no_instance_unheld() {
    let world = tempfile::tempdir().unwrap();
    let prefix = prefix("lists");
    let ledger = Arc::new(Ledger::default());
    let a = join(LOCAL_REDIS, &prefix, "a", 4, world.path(), &ledger, 1).await;
    let b = join(LOCAL_REDIS, &prefix, "b", 5, world.path(), &ledger, 1).await;
    let settled = || {
        let counts = ledger.counts();
        let share = |m: &str| counts.get(m).is_some_and(|n| (2..=3).contains(n));
        ledger.owners().len() == 5 && share("a") && share("b")
    };
    wait_for("all 5 instances held, 2 or 3 each", settled).await;
    // Held for good, not a moment between hand-overs: still so two leases later.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        assert!(settled(), "an instance left unheld: {:?}", ledger.owners());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ledger.owners()["inst04"], "b", "only b knows inst04");
    assert!(ledger.overlaps.lock().unwrap().is_empty());
    for m in [a, b] {
        m.stop.cancel();
        tokio::time::timeout(WAIT, m.task).await.unwrap().unwrap();
    }
}

/// Defect (found by review): the once-per-lease reconnect after a replaced session ignored a
/// failed open; the instance stayed closed while its lease held, every command ending 503.
#[tokio::test]
async fn an_owner_whose_reconnect_failed_connects_again_while_it_holds_the_lease() {
    let world = tempfile::tempdir().unwrap();
    let prefix = prefix("reconnect-failed");
    let ledger = Arc::new(Ledger::default());
    let a = join(LOCAL_REDIS, &prefix, "a", 1, world.path(), &ledger, 1).await;
    let instance = serving_inst00(&ledger, &a).await;
    let chat = normalise_number("5511999999999").unwrap();
    let delete = || delete_as_owner(&instance, &chat);
    assert!(delete().await.is_ok());

    // Another client "took" the session, and connecting again fails for a while: the holder
    // file is a folder, so the simulated connect cannot write it.
    let holder = world.path().join("inst00.holder");
    std::fs::remove_file(&holder).unwrap();
    std::fs::create_dir(&holder).unwrap();
    let tried = || {
        std::fs::read_dir(world.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
    };
    wait_for("a reconnect tried and failed", tried).await;
    std::fs::remove_dir(&holder).unwrap();

    until("the owner deletes again", || async {
        delete().await.is_ok()
    })
    .await;
    a.stop.cancel();
    tokio::time::timeout(WAIT, a.task).await.unwrap().unwrap();
}

/// Defect (found by review): on a cold start the first worker to heartbeat saw only itself,
/// took every instance and opened every session, then handed two thirds over as the others
/// appeared a tick later: every session connected twice.
#[tokio::test]
async fn workers_starting_together_open_each_session_once() {
    let world = tempfile::tempdir().unwrap();
    let prefix = prefix("cold-start");
    let ledger = Arc::new(Ledger::default());
    let n = 12;
    let mut members = vec![];
    for name in ["a", "b", "c"] {
        members.push(join(LOCAL_REDIS, &prefix, name, n, world.path(), &ledger, 1).await);
    }
    wait_for("three members hold 4 each", || {
        balanced(&ledger, &["a", "b", "c"], n)
    })
    .await;
    let gains = ledger.gains.lock().unwrap().clone();
    assert_eq!(gains.len(), n, "each session opened once: {gains:?}");
    for m in members {
        m.stop.cancel();
        tokio::time::timeout(WAIT, m.task).await.unwrap().unwrap();
    }
}

/// Defect (found by review): sessions in PostgreSQL were keyed by instance name only, while
/// ownership is per deployment (broker namespace): two deployments sharing the database with
/// an instance of the same name fenced each other's session (and with two phones behind one
/// name, one's deletes would run on the other's account).
#[tokio::test]
async fn deployments_sharing_a_session_database_keep_their_sessions_apart() {
    let url = std::env::var("CDW_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let sessions = format!("[sessions]\nstore = \"postgres\"\npostgres_url = \"{url}\"\n");
    let chat = normalise_number("5511999999999").unwrap();
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let mut deployments = vec![];
    for name in ["blue", "green"] {
        let world = tempfile::tempdir().unwrap();
        let ledger = Arc::new(Ledger::default());
        let instances = instances_in(&format!("{name}{tag}"), 1, world.path(), &sessions).await;
        let member = join_troubled(
            LOCAL_REDIS,
            &prefix(name),
            "a",
            instances,
            &ledger,
            1,
            None,
            None,
        )
        .await;
        let instance = serving_inst00(&ledger, &member).await;
        deployments.push((world, ledger, member, instance));
    }
    for round in 0..3 {
        for (_, _, _, instance) in &deployments {
            let deleted = delete_as_owner(instance, &chat).await;
            assert!(deleted.is_ok(), "round {round}: {deleted:?}");
        }
    }
    for (_, _, member, _) in deployments {
        member.stop.cancel();
        tokio::time::timeout(WAIT, member.task)
            .await
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn while_redis_does_not_answer_a_worker_keeps_its_leases_until_they_end_and_takes_nothing() {
    let world = tempfile::tempdir().unwrap();
    let mut redis = PrivateRedis::start(&[]).await;
    let prefix = prefix("outage");
    let ledger = Arc::new(Ledger::default());
    let n = 6;
    let a = join(&redis.url(), &prefix, "a", n, world.path(), &ledger, 1).await;
    let b = join(&redis.url(), &prefix, "b", n, world.path(), &ledger, 1).await;
    wait_for("two members hold 3 each", || {
        balanced(&ledger, &["a", "b"], n)
    })
    .await;
    let held_before = ledger.owners();

    redis.stop().await;
    // Right after the outage began the leases still run: nothing was let go.
    assert_eq!(ledger.owners(), held_before);
    assert!(ledger.abrupt_losses.lock().unwrap().is_empty());
    // Once they end unrenewed, every instance is let go and fenced.
    wait_for("every lease let go", || ledger.owners().is_empty()).await;
    assert_eq!(ledger.abrupt_losses.lock().unwrap().len(), n);
    for m in [&a, &b] {
        assert!(m.instances.iter().all(|i| i.lease().check().is_err()));
    }

    redis.resume().await;
    wait_for("taken again, evenly", || balanced(&ledger, &["a", "b"], n)).await;
    assert!(ledger.overlaps.lock().unwrap().is_empty());
    assert!(lines(&world.path().join("overlaps.log")).is_empty());
    for m in [a, b] {
        m.stop.cancel();
        tokio::time::timeout(WAIT, m.task).await.unwrap().unwrap();
    }
}

/// Commands `from..to`, spread over the 6 instances, each for its own chat.
async fn publish(w: &TestWorker, from: usize, to: usize) {
    for k in from..to {
        let instance = format!("inst{:02}", k % 6);
        let id = format!("cmd-{k}");
        let body = format!(r#"{{"number": "55119{k:08}"}}"#);
        w.publish(Command::new(&instance, &id, TOKEN, body.as_bytes()))
            .await;
    }
}

fn worker_config(ns: &str, dir: &Path, shared: &Path, redis_prefix: &str, name: &str) -> Config {
    let toml = worker_toml(ns, dir, shared, redis_prefix, name, 20, "");
    Config::from_toml(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

/// A worker's config: 6 instances in a shared simulated WhatsApp world, each delete taking
/// `latency_ms`; `idempotency` is added to that section.
fn worker_toml(
    ns: &str,
    dir: &Path,
    shared: &Path,
    redis_prefix: &str,
    name: &str,
    latency_ms: u64,
    idempotency: &str,
) -> String {
    format!(
        r#"
[broker]
url = "{amqp}"
namespace = "{ns}"
[http]
port = 0
bind = "127.0.0.1"
[store]
path = "{dir}"
[worker]
name = "{name}"
shutdown_grace_ms = 5000
[idempotency]
backend = "redis"
redis_url = "{LOCAL_REDIS}"
key_prefix = "{redis_prefix}store:"
{idempotency}
[ownership]
enabled = true
key_prefix = "{redis_prefix}own:"
lease_ms = 3000
tick_ms = 200
[pacing]
deletes_per_minute = "unlimited"
{instances}
"#,
        amqp = amqp_url(),
        dir = dir.display(),
        instances = instances_toml(
            6,
            &shared.join("world"),
            &format!(
                ", latency_ms = {latency_ms}, effects_log = \"{}/effects.log\"",
                shared.display()
            )
        ),
    )
}

#[tokio::test]
async fn two_workers_share_the_instances_and_one_leaving_causes_no_503_and_no_second_session() {
    let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let shared = tempfile::tempdir().unwrap();
    let redis_prefix = prefix("workers");
    let start = |name: &'static str| {
        let dir = tempfile::tempdir().unwrap();
        let config = worker_config(&ns, dir.path(), shared.path(), &redis_prefix, name);
        TestWorker::start_with(config, ns.clone(), dir)
    };
    let mut first = start("first").await;
    let second = start("second").await;

    publish(&second, 0, 120).await;
    // Only once it has served some (on a loaded machine its consumers may start late).
    second
        .events
        .wait_until("the first worker answered", |all| {
            all.iter().any(|e| {
                e.properties
                    .app_id()
                    .as_ref()
                    .is_some_and(|a| a.as_str() == "first")
            })
        })
        .await;
    // "first" leaves while commands keep coming; they wait for the new owner.
    let leaving = async {
        first.halt().await;
    };
    tokio::join!(leaving, publish(&second, 120, 240));

    second
        .events
        .wait_until("every command answered", |all| answered(all) >= 240)
        .await;
    let events = second.events.all();
    let statuses: BTreeMap<i64, usize> = events.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry(status(e)).or_default() += 1;
        m
    });
    assert_eq!(statuses, BTreeMap::from([(200, 240)]), "{statuses:?}");
    let answered_by: BTreeSet<String> = events
        .iter()
        .filter_map(|e| e.properties.app_id().as_ref().map(|a| a.to_string()))
        .collect();
    assert_eq!(answered_by.len(), 2, "both workers served: {answered_by:?}");
    let effects = lines(&shared.path().join("effects.log"));
    let chats: BTreeSet<&str> = effects.iter().filter_map(|l| l.split(' ').nth(1)).collect();
    assert_eq!(effects.len(), 240, "one effect per command");
    assert_eq!(chats.len(), 240);
    assert!(lines(&shared.path().join("world/overlaps.log")).is_empty());
    // Queues moved between the workers without either rebuilding its broker connection (a
    // handed-over queue's cancelled consumer once looked like a lost connection).
    let metrics = http_get(second.http_addr.unwrap(), "/metrics")
        .await
        .unwrap();
    let reconnects: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("chat_delete_broker_reconnects_total") && !l.ends_with(" 0"))
        .collect();
    assert!(reconnects.is_empty(), "{reconnects:?}");
    second.stop().await;
}

/// Defect (found by review): a worker that could not reach RabbitMQ (bad credentials or CA
/// after a rollout) still took its share of the instances and kept it, serving none of them.
#[tokio::test]
async fn a_worker_that_cannot_reach_the_broker_holds_no_instance() {
    let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let shared = tempfile::tempdir().unwrap();
    let redis_prefix = prefix("no-broker");
    let dir = tempfile::tempdir().unwrap();
    let config = worker_config(&ns, dir.path(), shared.path(), &redis_prefix, "served");
    let served = TestWorker::start_with(config, ns.clone(), dir).await;
    publish(&served, 0, 12).await;
    served
        .events
        .wait_until("the first commands answered", |all| answered(all) == 12)
        .await;

    // A second worker, a process of its own, whose broker address is wrong.
    let cut_dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = worker_toml(
        &ns,
        cut_dir.path(),
        shared.path(),
        &redis_prefix,
        "cut",
        20,
        "",
    )
    .replace(&amqp_url(), "amqp://guest:guest@127.0.0.1:1/%2f")
    .replace("port = 0", &format!("port = {port}"));
    let config_file = cut_dir.path().join("config.toml");
    std::fs::write(&config_file, toml).unwrap();
    let log = std::fs::File::create(cut_dir.path().join("worker.log")).unwrap();
    let mut cut = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat-delete-worker"))
        .args(["--config", config_file.to_str().unwrap(), "run"])
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Once it has tried the broker three times it has had ticks enough to take its share.
    until("the cut-off worker tried the broker thrice", || async {
        let text = http_get(addr, "/metrics").await.unwrap_or_default();
        metric(&text, "chat_delete_broker_reconnects_total") >= 3.0
    })
    .await;

    publish(&served, 12, 24).await;
    served
        .events
        .wait_until("every command answered", |all| answered(all) == 24)
        .await;
    let redis = ::redis::Client::open(LOCAL_REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let leases: Vec<String> = (0..6)
        .map(|i| format!("{redis_prefix}own:{ns}:lease:inst{i:02}"))
        .collect();
    assert_eq!(held_by(&redis, &leases, "cut").await, 0);
    cut.start_kill().unwrap();
    let _ = cut.wait().await;
    served.stop().await;
}

/// Two workers splitting the 6 instances 3 / 3, each delete taking 3 s and each claim lasting
/// ten minutes: `second` in process, the other (`name`) a process of its own, with 12 commands
/// claimed, so the other's are under way.
struct UnderWay {
    second: TestWorker,
    other: tokio::process::Child,
    shared: tempfile::TempDir,
    redis: ::redis::aio::MultiplexedConnection,
    leases: Vec<String>,
}

impl UnderWay {
    async fn start(test: &str, name: &'static str) -> Self {
        let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let shared = tempfile::tempdir().unwrap();
        let redis_prefix = prefix(test);
        let config = |dir: &Path, name: &str| {
            let long_claims = "lease_secs = 600";
            let (world, latency_ms) = (shared.path(), 3_000);
            worker_toml(
                &ns,
                dir,
                world,
                &redis_prefix,
                name,
                latency_ms,
                long_claims,
            )
        };
        let dir = tempfile::tempdir().unwrap();
        let toml = config(dir.path(), "second");
        let config_of_second = Config::from_toml(&toml).unwrap();
        let second = TestWorker::start_with(config_of_second, ns.clone(), dir).await;
        let other_dir = shared.path().join(name);
        std::fs::create_dir(&other_dir).unwrap();
        let config_file = other_dir.join("config.toml");
        std::fs::write(&config_file, config(&other_dir, name)).unwrap();
        let log = std::fs::File::create(other_dir.join("worker.log")).unwrap();
        let other = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat-delete-worker"))
            .args(["--config", config_file.to_str().unwrap(), "run"])
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let redis = ::redis::Client::open(LOCAL_REDIS)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let leases = (0..6)
            .map(|i| format!("{redis_prefix}own:{ns}:lease:inst{i:02}"))
            .collect();
        let under_way = Self {
            second,
            other,
            shared,
            redis,
            leases,
        };
        until("a 3 / 3 split", || async {
            under_way.holds(name, 3).await && under_way.holds("second", 3).await
        })
        .await;

        // Two commands per instance; once all are claimed, the other's are under way.
        publish(&under_way.second, 0, 12).await;
        let index = format!("{redis_prefix}store:");
        until("all 12 claimed", || async {
            let claimed: usize = ::redis::cmd("ZCARD")
                .arg(&index)
                .query_async(&mut under_way.redis.clone())
                .await
                .unwrap();
            claimed == 12
        })
        .await;
        under_way
    }

    async fn holds(&self, member: &str, n: usize) -> bool {
        held_by(&self.redis, &self.leases, member).await == n
    }

    fn signal(&self, name: &str) {
        let pid = self.other.id().unwrap().to_string();
        let sent = std::process::Command::new("kill")
            .args([name, &pid])
            .status();
        assert!(sent.unwrap().success());
    }

    /// Every command answered 200 (by `second`), each chat deleted once.
    async fn all_answered_once(mut self) {
        let events = self
            .second
            .events
            .wait_until("every command answered", |all| answered(all) == 12)
            .await;
        assert!(events.iter().all(|e| status(e) == 200));
        let effects = lines(&self.shared.path().join("effects.log"));
        assert_eq!(effects.len(), 12, "one delete per command: {effects:?}");
        self.other.start_kill().unwrap();
        let _ = self.other.wait().await;
        self.second.stop().await;
    }
}

/// A worker paused past its lease while its deletes were under way wakes to find their
/// instances gone: every delete is refused at its fence and handed back, and with it the
/// command's idempotency claim, so the next owner answers at once rather than once the claim's
/// lease ran out (ten minutes here). Nothing is deleted twice.
#[tokio::test]
async fn commands_a_paused_worker_hands_back_are_answered_by_the_next_owner_at_once() {
    let under_way = UnderWay::start("paused", "paused").await;
    under_way.signal("-STOP");
    until("second takes over", || under_way.holds("second", 6)).await;
    under_way.signal("-CONT");
    under_way.all_answered_once().await;
}

/// Defect (found by users): a worker frozen (SIGSTOP, a VM stall) kept its instances'
/// commands for as long as it stayed frozen, although its leases had moved: the broker keeps a
/// consumer (the queue's single active one, with the deliveries it took) for as long as its
/// connection seems alive. With short heartbeats the broker lets it go within seconds, and the
/// next owner answers everything while the frozen worker is still frozen.
#[tokio::test]
async fn commands_of_a_frozen_worker_are_answered_by_the_next_owner_while_it_stays_frozen() {
    let under_way = UnderWay::start("frozen", "frozen").await;
    under_way.signal("-STOP");
    let events = under_way
        .second
        .events
        .wait_until("every command answered", |all| answered(all) == 12)
        .await;
    assert!(events.iter().all(|e| status(e) == 200));
    under_way.signal("-CONT");
    under_way.all_answered_once().await;
}

/// A worker killed while its deletes were under way leaves their claims behind. They were
/// taken under its leases on the instances, which ended: the next owner, holding a newer
/// lease, takes them over at once rather than once they ran out (ten minutes here).
#[tokio::test]
async fn commands_a_killed_worker_had_under_way_are_answered_by_the_next_owner_at_once() {
    let under_way = UnderWay::start("killed", "killed").await;
    under_way.signal("-KILL");
    under_way.all_answered_once().await;
}

/// How many commands the results answer.
fn answered(results: &[Delivery]) -> usize {
    results
        .iter()
        .filter_map(message_id)
        .collect::<BTreeSet<_>>()
        .len()
}

/// How many of the `leases` the worker named `member` holds.
async fn held_by(
    redis: &::redis::aio::MultiplexedConnection,
    leases: &[String],
    member: &str,
) -> usize {
    let holders: Vec<Option<String>> = ::redis::cmd("MGET")
        .arg(leases)
        .query_async(&mut redis.clone())
        .await
        .unwrap();
    let prefix = format!("{member}-");
    holders
        .iter()
        .flatten()
        .filter(|h| h.starts_with(&prefix))
        .count()
}
