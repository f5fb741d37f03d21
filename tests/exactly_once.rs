//! Exactly once when deletes are slow and stores misbehave, on the real RabbitMQ and Redis:
//! claims that outlive a slow delete, results remembered even when their record vanished,
//! answers that stay true while the store is down, and records a full Redis never evicts.

mod common;

use std::time::Duration;

use common::redis::PrivateRedis;
use common::*;
use lapin::types::AMQPValue;

const TOKEN: &str = "secret-tok-once";
const OK: &[u8] = br#"{"number": "5511999999999"}"#;

#[derive(Clone, Copy, Debug)]
enum Store {
    Embedded,
    Redis,
}

/// A worker with one simulated instance `alpha` taking `latency_ms` per delete; `store_toml`
/// picks the idempotency store.
fn config(store_toml: &str, latency_ms: u64, extra: &str) -> String {
    format!(
        r#"
{store_toml}
[retry]
in_process_attempts = 1
broker_delays_ms = [200, 200]
[pacing]
deletes_per_minute = "unlimited"
[instances.alpha]
token_sha256 = "{token}"
kind = "simulated"
simulated = {{ latency_ms = {latency_ms}, effects_log = "{{dir}}/effects.log" }}
{extra}
"#,
        token = hash(TOKEN),
    )
}

fn redis_toml(url: &str, prefix: &str, extra: &str) -> String {
    format!(
        "[idempotency]\nbackend = \"redis\"\nredis_url = \"{url}\"\nkey_prefix = \"{prefix}\"\n{extra}"
    )
}

fn store_toml(store: Store, extra: &str) -> String {
    match store {
        Store::Embedded => format!("[idempotency]\n{extra}"),
        Store::Redis => redis_toml(
            "redis://127.0.0.1:6379",
            &format!("test:{}:", uuid::Uuid::new_v4().simple()),
            extra,
        ),
    }
}

fn deletes(w: &TestWorker) -> usize {
    std::fs::read_to_string(w.dir.path().join("effects.log"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn replayed(d: &Delivery) -> bool {
    header(d, "replayed") == Some(&AMQPValue::Boolean(true))
}

fn with_correlation<'a>(id: &'a str, correlation: &'a str, body: &'a [u8]) -> Command<'a> {
    Command {
        correlation_id: Some(correlation),
        ..Command::new("alpha", id, TOKEN, body)
    }
}

/// Waits until `done()` holds, polling (for state outside the broker: files, Redis).
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the worker's `series` reaches 1.
async fn metric_reached(w: &TestWorker, series: &str, what: &str) {
    let addr = w.http_addr.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = http_get(addr, "/metrics").await.unwrap_or_default();
        if metric(&text, series) >= 1.0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The claim is renewed while a delete that takes longer than the lease runs, so a duplicate
/// sent meanwhile waits for the answer and replays it: one delete, one fresh answer.
async fn a_claim_outlives_a_slow_delete(store: Store) {
    let w = TestWorker::start(&config(&store_toml(store, "lease_secs = 2"), 5_000, "")).await;
    w.publish(with_correlation("slow-1", "first", OK)).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // the recipe: 100 ms apart
    w.publish(with_correlation("slow-1", "second", OK)).await;
    let first = w.events.by_correlation("first").await;
    let second = w.events.by_correlation("second").await;
    assert_eq!((status(&first), status(&second)), (200, 200));
    assert!(!replayed(&first), "the first delivery did the work");
    assert!(replayed(&second), "the duplicate replays it");
    assert_eq!(deletes(&w), 1, "one delete");
    let metrics = http_get(w.http_addr.unwrap(), "/metrics").await.unwrap();
    assert!(
        metrics.contains("chat_delete_claim_renewals_total{outcome=\"renewed\"}"),
        "the claim was renewed"
    );
    w.stop().await;
}

#[tokio::test]
async fn embedded_store_claim_outlives_a_slow_delete() {
    a_claim_outlives_a_slow_delete(Store::Embedded).await;
}

#[tokio::test]
async fn redis_store_claim_outlives_a_slow_delete() {
    a_claim_outlives_a_slow_delete(Store::Redis).await;
}

/// The record of a command at work vanishes from Redis (evicted, expired, lost in a
/// failover): the result is remembered all the same, so a later duplicate replays it.
#[tokio::test]
async fn a_result_is_remembered_when_its_record_vanished_meanwhile() {
    let redis = PrivateRedis::start(&[]).await;
    let prefix = "vanish:";
    let w = TestWorker::start(&config(&redis_toml(&redis.url(), prefix, ""), 1_500, "")).await;
    w.publish(with_correlation("gone-1", "first", OK)).await;
    let key = format!("{prefix}gone-1");
    eventually("the claim in Redis", || {
        redis.cli(&["hexists", &key, "lease_owner"]).as_deref() == Some("1")
    })
    .await;
    assert_eq!(redis.cli(&["del", &key]).as_deref(), Some("1"));
    let first = w.events.by_correlation("first").await;
    assert_eq!(status(&first), 200);
    assert_eq!(
        redis.cli(&["hexists", &key, "result"]).as_deref(),
        Some("1"),
        "the result is stored"
    );
    w.publish(with_correlation("gone-1", "again", OK)).await;
    let again = w.events.by_correlation("again").await;
    assert!(replayed(&again));
    assert_eq!(again.data, first.data);
    assert_eq!(deletes(&w), 1);
    w.stop().await;
}

/// Redis is down: a 400 is answered (it needs no memory), everything else waits, `/readyz`
/// says so; nothing is answered 500 for it. When Redis is back the waiting
/// command is answered once, and nothing is parked.
#[tokio::test]
async fn commands_wait_for_a_store_that_is_down_and_drain_when_it_returns() {
    let mut redis = PrivateRedis::start(&[]).await;
    let store = redis_toml(&redis.url(), "down:", "outage_wait_ms = 300");
    let w = TestWorker::start(&config(&store, 0, "")).await;
    let addr = w.http_addr.unwrap();
    redis.stop().await;

    w.publish(with_correlation("down-1", "valid", OK)).await;
    w.publish(with_correlation(
        "down-bad",
        "invalid",
        br#"{"number": "abc"}"#,
    ))
    .await;
    let invalid = w.events.by_correlation("invalid").await;
    assert_eq!(status(&invalid), 400);
    assert_eq!(
        body(&invalid),
        serde_json::json!({"success": false, "error": {"message": "Invalid number"}})
    );
    let ready = http_get(addr, "/readyz").await.unwrap();
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("store_reachable=false"), "{ready}");
    // Long enough for several tries through the retry queue (200 ms each, 300 ms of waiting):
    // none of them may turn into an answer.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        w.events
            .all()
            .iter()
            .all(|d| correlation_id(d) != Some("valid")),
        "no answer while the store is down"
    );
    assert_eq!(deletes(&w), 0);

    redis.resume().await;
    let valid = w.events.by_correlation("valid").await;
    assert_eq!(status(&valid), 200);
    assert!(!replayed(&valid));
    assert_eq!(deletes(&w), 1);
    w.wait_ready().await;
    assert!(
        w.events.all().iter().all(|d| status(d) < 500),
        "no 5xx caused by the outage"
    );
    w.stop().await;
}

/// Redis goes down right after the delete: the answer waits until the result is stored, it
/// is a 200 (the delete happened), and a duplicate replays it.
#[tokio::test]
async fn a_delete_that_happened_is_answered_200_once_the_store_is_back() {
    let mut redis = PrivateRedis::start(&[]).await;
    let prefix = "mid:";
    let store = redis_toml(&redis.url(), prefix, "outage_wait_ms = 300");
    let w = TestWorker::start(&config(&store, 1_000, "")).await;
    w.publish(with_correlation("mid-1", "first", OK)).await;
    let key = format!("{prefix}mid-1");
    eventually("the claim in Redis", || {
        redis.cli(&["hexists", &key, "lease_owner"]).as_deref() == Some("1")
    })
    .await;
    redis.stop().await;
    eventually("the delete", || deletes(&w) == 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        w.events.all().is_empty(),
        "not answered before it is stored"
    );

    redis.resume().await;
    let first = w.events.by_correlation("first").await;
    assert_eq!(status(&first), 200);
    w.publish(with_correlation("mid-1", "again", OK)).await;
    let again = w.events.by_correlation("again").await;
    assert!(replayed(&again));
    assert_eq!(deletes(&w), 1);
    w.stop().await;
}

/// Defect (found by review): with ownership on, Redis down for longer than the instance's
/// lease while a delete's record waited for it: the lease ran out, the command was dropped
/// mid-record and its id stayed marked "unrecorded" for the life of the process, so every
/// later delivery of it went round the shortest retry queue for ever, unanswered. A command
/// past its effect is now awaited and recorded, then answered.
#[tokio::test]
async fn a_delete_whose_record_outlives_the_instance_lease_is_answered_once_the_store_is_back() {
    let mut redis = PrivateRedis::start(&[]).await;
    let prefix = "lost:";
    let store = redis_toml(&redis.url(), prefix, "outage_wait_ms = 300");
    let ownership =
        "[ownership]\nenabled = true\nkey_prefix = \"lost-own:\"\nlease_ms = 1500\ntick_ms = 200\n";
    let w = TestWorker::start(&config(&store, 1_000, ownership)).await;
    w.publish(with_correlation("lost-1", "first", OK)).await;
    let key = format!("{prefix}lost-1");
    eventually("the claim in Redis", || {
        redis.cli(&["hexists", &key, "lease_owner"]).as_deref() == Some("1")
    })
    .await;
    redis.stop().await;
    eventually("the delete", || deletes(&w) == 1).await;
    let expired = "chat_delete_leases_lost_total{reason=\"expired\"}";
    metric_reached(&w, expired, "the lease never ran out").await;
    assert!(
        w.events.all().is_empty(),
        "not answered before it is stored"
    );

    redis.resume().await;
    let first = w.events.by_correlation("first").await;
    assert_eq!(status(&first), 200);
    w.publish(with_correlation("lost-1", "again", OK)).await;
    let again = w.events.by_correlation("again").await;
    assert_eq!(status(&again), 200);
    assert!(replayed(&again));
    assert_eq!(deletes(&w), 1, "deleted once");
    w.stop().await;
}

/// Defect (found by review): a begin whose reply came after the client had given up (500 ms)
/// was asked again under a new claim name, found its own first claim live and waited for it
/// to end: the command went round the retry queue for the claim's whole lease (ten minutes
/// here). The claim name is drawn once per delivery now, and a begin under the name that holds
/// the record is granted.
#[tokio::test]
async fn a_begin_retried_after_a_late_reply_is_not_kept_waiting_by_its_own_claim() {
    let redis = PrivateRedis::start(&[]).await;
    let store = redis_toml(&redis.url(), "late:", "lease_secs = 600");
    let w = TestWorker::start(&config(&store, 0, "")).await;
    // A first command, so that the next begin goes to the claim script at once.
    w.publish(with_correlation("warm-1", "warm", OK)).await;
    assert_eq!(status(&w.events.by_correlation("warm").await), 200);
    // Every client waits 900 ms: the begin's reply comes after the client gave up.
    assert_eq!(
        redis.cli(&["client", "pause", "900", "all"]).as_deref(),
        Some("OK")
    );
    let other = br#"{"number": "5511888888888"}"#;
    w.publish(with_correlation("late-1", "late", other)).await;
    let answer = w.events.by_correlation("late").await;
    assert_eq!(status(&answer), 200);
    w.stop().await;
}

/// Defect (found by review): a remembered result was as durable as the primary's own write:
/// nothing waited for a replica, so a failover to a replica that missed the write forgot an
/// answered result and a duplicate deleted again. With `redis_wait_replicas`, a result is
/// answered only once a replica holds it.
#[tokio::test]
async fn a_result_is_answered_only_once_a_replica_holds_it() {
    let primary = PrivateRedis::start(&[]).await;
    let port = primary.port.to_string();
    let replica = PrivateRedis::start(&["--replicaof", "127.0.0.1", &port]).await;
    eventually("the replica in sync", || {
        primary
            .cli(&["info", "replication"])
            .is_some_and(|info| info.contains("state=online"))
    })
    .await;
    let store = redis_toml(&primary.url(), "waited:", "redis_wait_replicas = 1");
    let w = TestWorker::start(&config(&store, 0, "")).await;
    replica.signal("-STOP");
    w.publish(with_correlation("waited-1", "first", OK)).await;
    eventually("the delete", || deletes(&w) == 1).await;
    // Bounded look: while the replica cannot take the write, the 200 is not out.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        w.events.all().is_empty(),
        "answered before a replica held the result"
    );
    replica.signal("-CONT");
    let first = w.events.by_correlation("first").await;
    assert_eq!(status(&first), 200);
    assert_eq!(
        replica
            .cli(&["hexists", "waited:waited-1", "result"])
            .as_deref(),
        Some("1"),
        "the replica holds the result that was answered"
    );
    w.stop().await;
}

/// A Redis at its memory limit with a `volatile-lru` policy evicts keys with a TTL: the
/// worker's records have none, so remembered results survive the pressure and duplicates
/// replay them, while other keys are evicted.
#[tokio::test]
async fn remembered_results_survive_eviction_under_volatile_lru() {
    let redis =
        PrivateRedis::start(&["--maxmemory", "4mb", "--maxmemory-policy", "volatile-lru"]).await;
    let w = TestWorker::start(&config(&redis_toml(&redis.url(), "lru:", ""), 0, "")).await;
    let ids: Vec<String> = (0..200).map(|i| format!("lru-{i}")).collect();
    let bodies: Vec<String> = (0..200)
        .map(|i| format!(r#"{{"number": "55119{i:08}"}}"#))
        .collect();
    for (id, body) in ids.iter().zip(&bodies) {
        w.publish(Command::new("alpha", id, TOKEN, body.as_bytes()))
            .await;
    }
    w.events
        .wait_until("every first answer", |all| all.len() >= ids.len())
        .await;

    // Memory pressure: keys with a TTL, more than fit.
    let filler = "x".repeat(4096);
    for i in 0..2_000 {
        redis.cli(&["set", &format!("filler:{i}"), &filler, "ex", "3600"]);
    }
    let evicted: u64 = redis
        .cli(&["info", "stats"])
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("evicted_keys:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(evicted > 0, "the pressure evicted keys");

    for (id, body) in ids.iter().zip(&bodies) {
        w.publish(with_correlation(
            id,
            &format!("again-{id}"),
            body.as_bytes(),
        ))
        .await;
    }
    let all = w
        .events
        .wait_until("every duplicate's answer", |all| all.len() >= 2 * ids.len())
        .await;
    let fresh = all
        .iter()
        .filter(|d| correlation_id(d).is_some_and(|c| c.starts_with("again-")))
        .filter(|d| !replayed(d))
        .count();
    assert_eq!(fresh, 0, "every duplicate replayed");
    assert_eq!(deletes(&w), ids.len());
    w.stop().await;
}

/// Mounts a small tmpfs at `path` (needs root); unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Option<Self> {
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| Self(path.to_owned()))
    }

    /// Writes a file until the file system is full; returns it.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while file
            .write_all(&chunk)
            .and_then(|()| file.sync_data())
            .is_ok()
        {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The embedded store's disk fills up. The store has some room inside its file, so a few
/// commits may still succeed; the burst outgrows it, commits fail and those commands wait (the
/// store reports itself unavailable). Once there is room again every command is answered once,
/// and every answer, including those given while the disk was full, is replayed from disk:
/// nothing was answered from a failed commit and no delete is repeated.
#[tokio::test]
async fn a_full_disk_makes_commands_wait_and_nothing_is_done_twice() {
    const BURST: usize = 400;
    let mount = tempfile::tempdir().unwrap();
    let Some(tmpfs) = Tmpfs::mount(mount.path(), "8m") else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let store = format!(
        "[idempotency]\npath = \"{}\"\noutage_wait_ms = 300\n",
        mount.path().join("idempotency.redb").display()
    );
    let w = TestWorker::start(&config(&store, 0, "")).await;
    w.publish(with_correlation("full-0", "before", OK)).await;
    assert_eq!(status(&w.events.by_correlation("before").await), 200);

    let filler = tmpfs.fill();
    let id = |i: usize| format!("full-{i}");
    let body = |i: usize| format!(r#"{{"number": "55119{i:08}"}}"#);
    for i in 1..=BURST {
        w.publish(with_correlation(
            &id(i),
            &format!("during-{i}"),
            body(i).as_bytes(),
        ))
        .await;
    }
    let waited = "chat_delete_store_waits_total";
    metric_reached(&w, waited, "no commit ever failed on the full disk").await;
    let answered_while_full = w.events.all().len() - 1;
    assert!(answered_while_full < BURST, "some commands wait for room");

    std::fs::remove_file(filler).unwrap();
    for i in 1..=BURST {
        let d = w.events.by_correlation(&format!("during-{i}")).await;
        assert_eq!(status(&d), 200);
    }
    for i in 1..=BURST {
        w.publish(with_correlation(
            &id(i),
            &format!("again-{i}"),
            body(i).as_bytes(),
        ))
        .await;
    }
    for i in 1..=BURST {
        let d = w.events.by_correlation(&format!("again-{i}")).await;
        assert!(replayed(&d), "{} answered from a commit that failed", id(i));
    }
    assert_eq!(deletes(&w), BURST + 1, "one delete per command");
    w.stop().await;
}
