//! Never twice, never lost: idempotency (both stores), retries, parking and replay from the
//! parking queue, against the real RabbitMQ, Redis and disk.

mod common;

use chat_delete_worker::bus as broker;
use chat_delete_worker::cli::parked;
use chat_delete_worker::config::BrokerConfig;
use common::*;
use lapin::types::AMQPValue;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TOKEN: &str = "secret-tok-rel";
const ACCOUNT: &str = "secret-tok-rel-account";

#[derive(Clone, Copy, Debug)]
enum Store {
    Embedded,
    Redis,
}

fn store_toml(store: Store) -> String {
    match store {
        Store::Embedded => String::new(),
        Store::Redis => format!(
            "[idempotency]\nbackend = \"redis\"\nkey_prefix = \"test:{}:\"\n",
            uuid::Uuid::new_v4().simple()
        ),
    }
}

/// A worker with fast retries; `extra` adds instance settings (the `{dir}` placeholder is the
/// test's data folder).
fn config(store: Store, alpha_sim: &str) -> String {
    format!(
        r#"
{store}
[worker]
concurrency_per_instance = 8
[retry]
in_process_attempts = 2
in_process_min_delay_ms = 5
in_process_max_delay_ms = 10
broker_delays_ms = [50, 50, 50]
[pacing]
deletes_per_minute = "unlimited"
[media.backend]
kind = "disk"
root = "{{dir}}/media"
[accounts.acme]
token_sha256 = "{account}"
[instances.alpha]
account = "acme"
token_sha256 = "{token}"
kind = "simulated"
simulated = {{ effects_log = "{{dir}}/effects.log" {alpha_sim} }}
[instances.beta]
account = "acme"
token_sha256 = "{token}"
kind = "simulated"
"#,
        store = store_toml(store),
        account = hash(ACCOUNT),
        token = hash(TOKEN),
    )
}

fn deletes(w: &TestWorker) -> usize {
    std::fs::read_to_string(w.dir.path().join("effects.log"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn replayed(d: &Delivery) -> bool {
    header(d, "replayed") == Some(&AMQPValue::Boolean(true))
}

const OK: &[u8] = br#"{"number": "5511999999999"}"#;

async fn replays_remembered_results_and_rejects_changed_requests(store: Store) {
    let w = TestWorker::start(&config(store, "")).await;
    w.publish(Command::new("alpha", "id-1", TOKEN, OK)).await;
    let first = w.events.by_id("id-1").await;
    assert_eq!(status(&first), 200);
    assert!(!replayed(&first));

    // Same request, written differently: replayed, nothing done again.
    w.publish(Command {
        correlation_id: Some("again"),
        ..Command::new(
            "alpha",
            "id-1",
            TOKEN,
            br#"{"number": "+55 11 99999-9999"}"#,
        )
    })
    .await;
    let again = w.events.by_correlation("again").await;
    assert!(replayed(&again));
    assert_eq!(status(&again), 200);
    assert_eq!(again.data, first.data);
    assert_eq!(
        header_int(&again, "attempts"),
        header_int(&first, "attempts")
    );
    assert_eq!(deletes(&w), 1);

    // Different body, token or instance: 409, not remembered, nothing done.
    for (corr, cmd) in [
        (
            "other-body",
            Command::new("alpha", "id-1", TOKEN, br#"{"number": "5511999999998"}"#),
        ),
        (
            "other-media",
            Command::new(
                "alpha",
                "id-1",
                TOKEN,
                br#"{"number": "5511999999999", "deleteMedia": true}"#,
            ),
        ),
        ("other-token", Command::new("alpha", "id-1", ACCOUNT, OK)),
        ("other-instance", Command::new("beta", "id-1", TOKEN, OK)),
    ] {
        w.publish(Command {
            correlation_id: Some(corr),
            ..cmd
        })
        .await;
        let d = w.events.by_correlation(corr).await;
        assert_eq!(status(&d), 409, "{corr}");
        assert_eq!(
            body(&d),
            serde_json::json!({"success": false, "error": {"message": "Idempotency id was already used with a different request"}})
        );
        assert!(!replayed(&d));
        assert_matches_schema(&d);
    }
    assert_eq!(deletes(&w), 1);

    // A 4xx is remembered too.
    w.publish(Command::new(
        "alpha",
        "id-bad",
        TOKEN,
        br#"{"number": "abc"}"#,
    ))
    .await;
    assert_eq!(status(&w.events.by_id("id-bad").await), 400);
    w.publish(Command {
        correlation_id: Some("bad-again"),
        ..Command::new("alpha", "id-bad", TOKEN, br#"{"number": "abc"}"#)
    })
    .await;
    let d = w.events.by_correlation("bad-again").await;
    assert_eq!(status(&d), 400);
    assert!(replayed(&d));
    w.publish(Command {
        correlation_id: Some("bad-fixed"),
        ..Command::new("alpha", "id-bad", TOKEN, OK)
    })
    .await;
    assert_eq!(status(&w.events.by_correlation("bad-fixed").await), 409);
    assert_eq!(deletes(&w), 1);
    w.stop().await;
}

#[tokio::test]
async fn embedded_store_replays_and_conflicts() {
    replays_remembered_results_and_rejects_changed_requests(Store::Embedded).await;
}

#[tokio::test]
async fn redis_store_replays_and_conflicts() {
    replays_remembered_results_and_rejects_changed_requests(Store::Redis).await;
}

async fn concurrent_duplicates_act_once(store: Store) {
    let w = TestWorker::start(&config(store, ", latency_ms = 300")).await;
    for corr in ["a", "b", "c"] {
        w.publish(Command {
            correlation_id: Some(corr),
            ..Command::new("alpha", "dup-1", TOKEN, OK)
        })
        .await;
    }
    let all = w
        .events
        .wait_until("three results", |all| all.len() >= 3)
        .await;
    assert_eq!(deletes(&w), 1, "one delete for three concurrent deliveries");
    assert!(all.iter().all(|d| status(d) == 200));
    assert_eq!(all.iter().filter(|d| !replayed(d)).count(), 1);
    w.stop().await;
}

#[tokio::test]
async fn embedded_store_lets_one_of_concurrent_duplicates_act() {
    concurrent_duplicates_act_once(Store::Embedded).await;
}

#[tokio::test]
async fn redis_store_lets_one_of_concurrent_duplicates_act() {
    concurrent_duplicates_act_once(Store::Redis).await;
}

async fn failures_are_not_remembered_and_resume_at_the_purge(store: Store) {
    let w = TestWorker::start(&config(store, "")).await;
    // A regular file where the media root should be: every purge fails, and retrying would
    // not help, so the failure is final at once (and parked).
    let media_root = w.dir.path().join("media");
    std::fs::write(&media_root, b"not a folder").unwrap();
    let with_media = br#"{"number": "5511999999999", "deleteMedia": true}"#;
    w.publish(Command::new("alpha", "purge-1", TOKEN, with_media))
        .await;
    let failed = w.events.by_id("purge-1").await;
    assert_eq!(status(&failed), 500);
    let message = body(&failed)["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.starts_with("Failed to delete media: "), "{message}");
    assert_matches_schema(&failed);
    assert_eq!(header_int(&failed, "attempts"), Some(1));
    assert_eq!(deletes(&w), 1);

    // Storage back: the same id does the work again, starting at the purge.
    std::fs::remove_file(&media_root).unwrap();
    std::fs::create_dir_all(media_root.join("alpha/5511999999999@s.whatsapp.net")).unwrap();
    std::fs::write(
        media_root.join("alpha/5511999999999@s.whatsapp.net/a.jpg"),
        b"x",
    )
    .unwrap();
    w.publish(Command {
        correlation_id: Some("retry"),
        ..Command::new("alpha", "purge-1", TOKEN, with_media)
    })
    .await;
    let ok = w.events.by_correlation("retry").await;
    assert_eq!(status(&ok), 200);
    assert!(!replayed(&ok));
    assert_eq!(deletes(&w), 1, "the chat delete is not repeated");
    assert!(
        !media_root
            .join("alpha/5511999999999@s.whatsapp.net")
            .exists()
    );
    w.stop().await;
}

#[tokio::test]
async fn embedded_store_resumes_at_the_purge() {
    failures_are_not_remembered_and_resume_at_the_purge(Store::Embedded).await;
}

#[tokio::test]
async fn redis_store_resumes_at_the_purge() {
    failures_are_not_remembered_and_resume_at_the_purge(Store::Redis).await;
}

#[tokio::test]
async fn transient_failures_are_retried_to_one_delete_and_one_success() {
    // 5 failures: 2 in process, then through the retry queue twice more, then success.
    let w = TestWorker::start(&config(
        Store::Embedded,
        ", fail_first = 5, failure = \"server_error\"",
    ))
    .await;
    w.publish(Command::new("alpha", "flaky-1", TOKEN, OK)).await;
    let d = w.events.by_id("flaky-1").await;
    assert_eq!(status(&d), 200);
    assert_eq!(header_int(&d, "attempts"), Some(6));
    assert_eq!(deletes(&w), 1);
    assert_eq!(w.events.all().len(), 1, "one result only");
    w.stop().await;
}

#[tokio::test]
async fn a_session_that_never_connects_is_parked_then_replayed_to_success() {
    let flag = "connected_flag_file = \"{dir}/connected\"";
    let w = TestWorker::start(&config(Store::Embedded, &format!(", {flag}"))).await;
    w.publish(Command::new("alpha", "offline-1", TOKEN, OK))
        .await;
    let d = w.events.by_id("offline-1").await;
    assert_eq!(status(&d), 503);
    assert_eq!(
        body(&d)["error"]["message"],
        "Instance is not connected to WhatsApp"
    );
    assert_eq!(
        header_int(&d, "attempts"),
        Some(8),
        "2 tries x (1 + 3 retries)"
    );

    let cfg = BrokerConfig {
        url: amqp_url(),
        ..Default::default()
    };
    let connection = broker::connect(&cfg, "test").await.unwrap();
    wait_parked(&connection, &w.names, "offline-1").await;
    let listed = parked::list(&connection, &w.names, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].idempotency_id.as_deref(), Some("offline-1"));
    assert_eq!(listed[0].instance.as_deref(), Some("alpha"));
    assert_eq!(listed[0].status, Some(503));
    // Listing leaves it parked.
    assert_eq!(
        parked::list(&connection, &w.names, 10).await.unwrap().len(),
        1
    );

    std::fs::write(w.dir.path().join("connected"), b"").unwrap();
    assert_eq!(
        parked::replay(&connection, &w.names, &["offline-1".into()])
            .await
            .unwrap(),
        1
    );
    let all = w
        .events
        .wait_until("a second result", |all| all.len() >= 2)
        .await;
    let last = all.last().unwrap();
    assert_eq!(status(last), 200);
    assert_eq!(header_int(last, "attempts"), Some(1), "retries start over");
    assert_eq!(deletes(&w), 1);
    assert!(
        parked::list(&connection, &w.names, 10)
            .await
            .unwrap()
            .is_empty()
    );
    w.stop().await;
}

/// The broker's deliveries stop reaching the worker while everything else on its connection
/// flows (RabbitMQ can leave a quorum queue's deliveries checked out to a consumer after a
/// leader change, rabbitmq-server#15473; here a relay drops them): the worker sees commands
/// waiting for its idle consumer, reconnects, and they are answered.
// Several threads: the relay must run while a connection through it is being made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_the_broker_stopped_feeding_is_started_again() {
    let relay = Relay::to(&amqp_url()).await;
    let w = TestWorker::start_tuned(&config(Store::Embedded, ""), |c| {
        c.broker.url = relay.url.clone();
        c.broker.stall_after_ms = 1_000;
        c.broker.prefetch = 1;
    })
    .await;
    relay.drop_deliveries_on_open_connections();
    // The first is dropped on its way and fills the prefetch; the second waits in the queue.
    for id in ["stalled-1", "stalled-2"] {
        w.publish(Command::new("alpha", id, TOKEN, OK)).await;
    }
    let answered = w
        .events
        .wait_until("both answered", |all| all.len() >= 2)
        .await;
    assert!(answered.iter().all(|d| status(d) == 200));
    assert_eq!(deletes(&w), 2);
    let metrics = http_get(w.http_addr.unwrap(), "/metrics").await.unwrap();
    let stalls = metric(&metrics, "chat_delete_consumer_stalls_total ");
    assert!(stalls >= 1.0, "{metrics}");
    w.stop().await;
}

/// A TCP relay to the broker that can drop the deliveries (`basic.deliver` and its content
/// frames) of the connections open so far, passing everything else.
struct Relay {
    url: String,
    dropping: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl Relay {
    async fn to(amqp_url: &str) -> Self {
        let rest = amqp_url.split_once('@').expect("user@host in the URL").1;
        let (upstream, vhost) = rest.split_once('/').unwrap_or((rest, ""));
        let upstream = upstream.to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "amqp://guest:guest@{}/{vhost}",
            listener.local_addr().unwrap()
        );
        let dropping: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let connections = dropping.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(broker) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let dropping = Arc::new(AtomicBool::new(false));
                connections.lock().unwrap().push(dropping.clone());
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_broker, mut to_broker) = broker.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_client, &mut to_broker).await;
                });
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut pending = Vec::new();
                    let mut buf = vec![0; 64 * 1024];
                    // Channels whose delivery content is being dropped.
                    let mut skipping = std::collections::HashSet::new();
                    while let Ok(n @ 1..) = from_broker.read(&mut buf).await {
                        pending.extend_from_slice(&buf[..n]);
                        let mut out = Vec::new();
                        // Frame: type (1), channel (2), size (4), payload, end (1).
                        while pending.len() >= 7 {
                            let size = u32::from_be_bytes(pending[3..7].try_into().unwrap());
                            let len = 8 + size as usize;
                            if pending.len() < len {
                                break;
                            }
                            let frame: Vec<u8> = pending.drain(..len).collect();
                            let channel = u16::from_be_bytes([frame[1], frame[2]]);
                            let deliver = frame[0] == 1 && frame[7..11] == [0, 60, 0, 60];
                            if frame[0] == 1 {
                                skipping.remove(&channel);
                            }
                            if deliver && dropping.load(Ordering::SeqCst) {
                                skipping.insert(channel);
                            }
                            if !skipping.contains(&channel) {
                                out.extend_from_slice(&frame);
                            }
                        }
                        if to_client.write_all(&out).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self { url, dropping }
    }

    fn drop_deliveries_on_open_connections(&self) {
        for dropping in self.dropping.lock().unwrap().iter() {
            dropping.store(true, Ordering::SeqCst);
        }
    }
}

/// A TCP hop between the worker and the broker that can go silent: it keeps the connection
/// open and stops passing bytes either way, as a broker out of file handles or a half-open
/// connection does.
struct SilentableHop {
    port: u16,
    silent: Arc<AtomicBool>,
}

/// Copies `from` to `to` until either ends; while `silent`, holds what it read.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    silent: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while silent.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl SilentableHop {
    async fn start(upstream: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silent = Arc::new(AtomicBool::new(false));
        let (upstream, flag) = (upstream.to_owned(), silent.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pipe(client_read, server_write, flag.clone()));
                tokio::spawn(pipe(server_read, client_write, flag.clone()));
            }
        });
        Self { port, silent }
    }

    fn go_silent(&self) {
        self.silent.store(true, Ordering::Relaxed);
    }
}

/// Defect (issue: a broker out of file handles took the machine down with it): a worker told
/// to stop while its broker no longer answered waited for the broker to confirm each consumer's
/// cancel, for ever (until something reset the connection). Its shutdown now takes at most
/// its grace plus a bounded wait for each of the broker's answers.
#[tokio::test]
async fn a_stop_while_the_broker_does_not_answer_ends_in_bounded_time() {
    let hop = SilentableHop::start("127.0.0.1:5672").await;
    let token = "secret-tok-silent";
    let cfg = format!(
        r#"
[worker]
shutdown_grace_ms = 1000
[instances.alpha]
token_sha256 = "{}"
kind = "simulated"
"#,
        hash(token)
    );
    let port = hop.port;
    let w = TestWorker::start_tuned(&cfg, move |config| {
        // No heartbeats: nothing but the worker's own bounds ends the wait.
        config.broker.url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f?heartbeat=0");
    })
    .await;
    w.publish(Command::new("alpha", "silent-1", token, OK))
        .await;
    let first = w.events.by_id("silent-1").await;
    assert_eq!(status(&first), 200);
    hop.go_silent();
    // Fails the test unless the worker has exited within WAIT (20 s).
    w.stop().await;
}
