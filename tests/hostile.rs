//! Nothing one publisher sends can hurt another, on the real RabbitMQ: a `reply_to` that
//! refuses its copy, bodies far over the limit, a parking stream read again and again, tokens
//! that never rest on the broker, and queues that say what happens to the undeliverable.

mod common;

use std::process::Command as Process;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

const TOKEN: &str = "secret-tok-hostile";
const OK: &[u8] = br#"{"number": "5511999999999"}"#;

fn config(extra: &str) -> String {
    format!(
        r#"
[retry]
in_process_attempts = 1
broker_delays_ms = [50]
[pacing]
deletes_per_minute = "unlimited"
[instances.alpha]
token_sha256 = "{token}"
kind = "simulated"
{extra}
"#,
        token = hash(TOKEN),
    )
}

/// Publishes one command with the token and waits for the broker's confirm.
async fn publish_confirmed(
    channel: &lapin::Channel,
    exchange: &str,
    key: &str,
    id: &str,
    body: &[u8],
) {
    let mut headers = FieldTable::default();
    headers.insert("token".into(), AMQPValue::LongString(TOKEN.into()));
    let props = BasicProperties::default()
        .with_message_id(id.into())
        .with_headers(headers);
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// A worker's config in `dir` (HTTP on an ephemeral port) with `broker_extra` in `[broker]`,
/// and its topology declared, as `topology` would before the worker starts.
async fn declared(
    ns: &str,
    dir: &tempfile::TempDir,
    broker_extra: &str,
    connection: &Connection,
) -> chat_delete_worker::config::Config {
    let toml = format!(
        "[broker]\nurl = \"{}\"\nnamespace = \"{ns}\"\n{broker_extra}\n[http]\nport = 0\nbind = \"127.0.0.1\"\n[store]\npath = \"{}\"\n{}",
        amqp_url(),
        dir.path().display(),
        config(""),
    );
    let cfg = chat_delete_worker::config::Config::from_toml(&toml).unwrap();
    let names = chat_delete_worker::contract::Names::new(ns);
    let tiers = cfg.retry.tiers();
    chat_delete_worker::bus::topology::Topology::new(&cfg.broker, &names, &["alpha"], &tiers)
        .declare(connection)
        .await
        .unwrap();
    cfg
}

/// `reply_to` pointing at a queue that refuses every publish (full, `reject-publish`) or at a
/// queue that does not exist: each command is still answered on the events exchange and
/// acked, the connection is never rebuilt, and a later command with a good `reply_to` gets its
/// copy.
#[tokio::test]
async fn a_reply_to_that_refuses_costs_nothing_but_its_own_copy() {
    let w = TestWorker::start(&config("")).await;
    let trap = format!("{}.trap", w.ns);
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    w.channel
        .queue_declare(
            trap.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    let targets = [trap.as_str(), "no-such-queue-anywhere"];
    for round in 0..5 {
        for (i, target) in targets.iter().enumerate() {
            let id = format!("trap-{round}-{i}");
            w.publish(Command {
                reply_to: Some(target),
                ..Command::new("alpha", &id, TOKEN, OK)
            })
            .await;
        }
    }
    let answered = w
        .events
        .wait_until("every trapped command's answer", |all| all.len() >= 10)
        .await;
    assert!(answered.iter().all(|d| status(d) == 200));
    let (reply_queue, replies) = private_queue(&w.channel, None).await;
    w.publish(Command {
        reply_to: Some(&reply_queue),
        ..Command::new("alpha", "good-reply", TOKEN, OK)
    })
    .await;
    assert_eq!(status(&replies.by_id("good-reply").await), 200);
    let metrics = http_get(w.http_addr.unwrap(), "/metrics").await.unwrap();
    assert_eq!(
        metric(&metrics, "chat_delete_broker_reconnects_total"),
        0.0,
        "the connection was never rebuilt"
    );
    for reason in ["nacked", "unroutable"] {
        let line = format!("chat_delete_reply_to_failed_total{{reason=\"{reason}\"}}");
        assert!(metric(&metrics, &line) >= 5.0, "{line} in {metrics}");
    }
    assert!(
        answered
            .iter()
            .all(|d| header_int(d, "attempts") == Some(1))
    );
    // Never consumed, so `auto_delete` never removes it: the worker's stop does not know it.
    w.channel
        .queue_delete(trap.as_str().into(), Default::default())
        .await
        .unwrap();
    w.stop().await;
}

/// Every queue the worker declares says what happens to what it cannot deliver, whatever the
/// broker version's defaults: a delivery limit, at-least-once dead-lettering (which needs
/// publishers refused rather than messages dropped when full); the parking queue is a stream.
#[tokio::test]
async fn every_queue_states_its_limits_and_dead_lettering() {
    let w = TestWorker::start(&config("")).await;
    let out = Process::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "arguments",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{}.", w.ns)))
        .collect();
    assert!(ours.len() >= 5, "{ours:?}");
    for line in ours {
        if line.starts_with(&w.names.parked_queue()) {
            assert!(line.contains(r#"{"x-queue-type","stream"}"#), "{line}");
            continue;
        }
        for arg in [
            r#"{"x-delivery-limit",20}"#,
            r#"{"x-dead-letter-strategy","at-least-once"}"#,
            r#"{"x-overflow","reject-publish"}"#,
            r#"{"x-queue-type","quorum"}"#,
        ] {
            assert!(line.contains(arg), "{arg} missing: {line}");
        }
    }
    w.stop().await;
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Process::new("rabbitmqctl").args(args).output().unwrap();
    assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The retry hop is at least once: a command whose retry delay ran out while its instance queue
/// could not take it (full, `reject-publish`) stays with the broker and arrives once the queue
/// takes it again. At most once, it was dropped and never answered.
#[tokio::test]
async fn a_retry_the_instance_queue_refuses_is_kept_until_it_can_be_delivered() {
    // The broker offers a refused dead-letter again after this long (default 3 minutes); it
    // applies to queues declared from now on.
    rabbitmqctl(&[
        "eval",
        "application:set_env(rabbit, dead_letter_worker_publisher_confirm_timeout, 1000).",
    ]);
    let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let names = chat_delete_worker::contract::Names::new(&ns);
    let dir = tempfile::tempdir().unwrap();
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let cfg = declared(&ns, &dir, "", &connection).await;
    // The instance queue is full: a quorum queue takes one message over its limit, then refuses.
    let policy = format!("{ns}-full");
    let instance_queue = names.instance_queue("alpha");
    rabbitmqctl(&[
        "set_policy",
        &policy,
        &format!("^{}$", instance_queue.replace('.', "\\.")),
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
        "--apply-to",
        "queues",
    ]);
    wait_for_queue(&instance_queue, "policy", &policy).await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish_confirmed(&channel, &names.commands_exchange(), "alpha", "filler", OK).await;
    // A command as the worker leaves it in the retry queue; its delay runs out at once.
    publish_confirmed(
        &channel,
        &names.retry_exchange(50),
        "alpha",
        "refused-hop",
        OK,
    )
    .await;
    wait_for_queue(&names.retry_queue(50), "messages_ready", "0").await;

    // Room again. (Removing the limit altogether would leave refused publishers waiting for
    // good on RabbitMQ 3.10: a queue without a limit never tells them to go on.)
    let room = format!("{ns}-room");
    rabbitmqctl(&[
        "set_policy",
        &room,
        &format!("^{}$", instance_queue.replace('.', "\\.")),
        r#"{"max-length":1000,"overflow":"reject-publish"}"#,
        "--priority",
        "1",
        "--apply-to",
        "queues",
    ]);
    wait_for_queue(&instance_queue, "policy", &room).await;
    let w = TestWorker::start_with(cfg, ns, dir).await;
    assert_eq!(status(&w.events.by_id("filler").await), 200);
    assert_eq!(status(&w.events.by_id("refused-hop").await), 200);
    rabbitmqctl(&["clear_policy", &policy]);
    rabbitmqctl(&["clear_policy", &room]);
    w.stop().await;
}

/// Waits until `rabbitmqctl list_queues` shows `value` in `column` for `queue`.
async fn wait_for_queue(queue: &str, column: &str, value: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let listed = rabbitmqctl(&["list_queues", "-q", "--no-table-headers", "name", column]);
        if listed
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == [queue, value])
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue} never showed {column}={value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A command that crash-loops (here: a consumer that keeps handing it back) is dead-lettered
/// after the delivery limit, answered, and parked without its token.
#[tokio::test]
async fn a_command_over_the_delivery_limit_is_answered_and_parked_without_its_token() {
    let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let names = chat_delete_worker::contract::Names::new(&ns);
    // A consumer of the instance queue that came first: single active consumer makes it the
    // one that gets the command, and it hands it back every time.
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = declared(&ns, &dir, "delivery_limit = 2", &connection).await;
    let looping = connection.create_channel().await.unwrap();
    let mut looper = looping
        .basic_consume(
            names.instance_queue("alpha").as_str().into(),
            "looper".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let w = TestWorker::start_with(cfg, ns, dir).await;
    w.publish(Command::new("alpha", "looping-1", TOKEN, OK))
        .await;
    let mut handed_back = 0;
    while handed_back < 3 {
        let next = tokio::time::timeout(Duration::from_millis(500), looper.next()).await;
        let Ok(Some(Ok(delivery))) = next else { break };
        delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .unwrap();
        handed_back += 1;
    }
    let answer = w.events.by_id("looping-1").await;
    assert_eq!(status(&answer), 500);
    assert_eq!(
        body(&answer)["error"]["message"],
        "Failed to delete chat: it was delivered too many times without an answer"
    );
    wait_parked(&w.connection, &w.names, "looping-1").await;
    let parked = read_parked(&w.connection, &w.names).await;
    assert_no_token(&parked);
    let _ = looping.close(200, "done".into()).await;
    w.stop().await;
}

/// Everything in the parking stream, read raw (properties and body).
async fn read_parked(
    connection: &Connection,
    names: &chat_delete_worker::contract::Names,
) -> Vec<(BasicProperties, Vec<u8>)> {
    let queue = names.parked_queue();
    let (channel, mut consumer) = chat_delete_worker::bus::read_stream(connection, &queue, 100)
        .await
        .unwrap();
    let mut out = vec![];
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(1), consumer.next()).await
    {
        out.push((d.properties.clone(), d.data.clone()));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let _ = channel.close(200, "read".into()).await;
    out
}

fn assert_no_token(messages: &[(BasicProperties, Vec<u8>)]) {
    assert!(!messages.is_empty());
    for (props, body) in messages {
        let text = format!("{props:?}");
        assert!(!text.contains(TOKEN), "a clear token at rest: {text}");
        assert!(!String::from_utf8_lossy(body).contains(TOKEN));
        let headers = props.headers().clone().unwrap_or_default();
        assert!(!headers.inner().contains_key("token"), "{text}");
    }
}

/// Retried and parked copies carry a proof instead of the token; the proof opens the same
/// command again (a parked command is replayed to success), listing the parking stream many
/// times neither loses nor redelivers anything, and lapin's own logs never show a header.
#[tokio::test]
async fn copies_carry_no_token_and_the_parking_stream_is_read_without_side_effects() {
    let w = TestWorker::start(&config(
        r#"simulated = { connected_flag_file = "{dir}/connected" }"#,
    ))
    .await;
    w.publish(Command::new("alpha", "parked-1", TOKEN, OK))
        .await;
    assert_eq!(status(&w.events.by_id("parked-1").await), 503);
    wait_parked(&w.connection, &w.names, "parked-1").await;
    for _ in 0..50 {
        let listed = chat_delete_worker::cli::parked::list(&w.connection, &w.names, 10)
            .await
            .unwrap();
        assert_eq!(listed.len(), 1, "listing keeps it, and shows it once");
    }
    let parked = read_parked(&w.connection, &w.names).await;
    assert_no_token(&parked);
    let (props, _) = &parked[0];
    let headers = props.headers().clone().unwrap();
    assert!(headers.inner().contains_key("x-chat-delete-token-proof"));
    assert!(!headers.inner().contains_key("x-delivery-count"));

    std::fs::write(w.dir.path().join("connected"), b"").unwrap();
    let moved = chat_delete_worker::cli::parked::replay(&w.connection, &w.names, &[])
        .await
        .unwrap();
    assert_eq!(moved, 1);
    let all = w
        .events
        .wait_until("the replayed answer", |all| all.len() >= 2)
        .await;
    assert_eq!(status(all.last().unwrap()), 200, "the proof opened it");
    assert!(
        chat_delete_worker::cli::parked::list(&w.connection, &w.names, 10)
            .await
            .unwrap()
            .is_empty(),
        "a replayed command is no longer listed"
    );
    let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    assert!(!logs.contains(TOKEN), "a token in the logs");
    let lapin_detail = logs
        .lines()
        .filter(|l| l.contains(" lapin") || l.contains(" amq_protocol"))
        .find(|l| l.contains("DEBUG") || l.contains("TRACE"));
    assert_eq!(lapin_detail, None, "lapin logs below info");
    w.stop().await;
}

/// A forged proof, or a proof taken from another command, opens nothing.
#[tokio::test]
async fn a_proof_opens_its_own_command_only() {
    let w = TestWorker::start(&config("")).await;
    let key = chat_delete_worker::config::TokenHash::of(TOKEN.as_bytes());
    let proof = chat_delete_worker::auth::TokenProof::new(&key, "alpha", "proof-1", OK).to_hex();
    let with_proof = |id: &'static str, body: &'static [u8], proof: &str| Command {
        token: None,
        extra_headers: vec![(
            "x-chat-delete-token-proof",
            AMQPValue::LongString(proof.into()),
        )],
        ..Command::new("alpha", id, TOKEN, body)
    };
    w.publish(with_proof("proof-1", OK, &proof)).await;
    assert_eq!(status(&w.events.by_id("proof-1").await), 200);
    w.publish(with_proof("proof-2", OK, &proof)).await;
    assert_eq!(status(&w.events.by_id("proof-2").await), 401, "another id");
    w.publish(with_proof(
        "proof-1",
        br#"{"number": "5511999999998"}"#,
        &proof,
    ))
    .await;
    let other_body = w
        .events
        .wait_until("the changed body's answer", |all| {
            all.iter()
                .filter(|d| message_id(d) == Some("proof-1"))
                .count()
                >= 2
        })
        .await;
    assert_eq!(status(other_body.last().unwrap()), 401, "another body");
    w.stop().await;
}

/// Bodies far over the limit, to an instance and to an instance nobody hosts, are answered
/// `400 Invalid request body` and `404`, and the worker's memory stays bounded: the prefetch
/// comes down to one delivery at a time as soon as an oversized one arrives.
#[tokio::test]
async fn oversized_bodies_are_answered_in_bounded_memory() {
    let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let toml = format!(
        "[broker]\nurl = \"{}\"\nnamespace = \"{ns}\"\nprefetch = 64\n[http]\nenabled = false\n[store]\npath = \"{}\"\n{}",
        amqp_url(),
        dir.path().display(),
        config(""),
    );
    std::fs::write(&path, toml).unwrap();
    let bin = env!("CARGO_BIN_EXE_chat-delete-worker");
    let declared = Process::new(bin)
        .args(["--config", path.to_str().unwrap(), "topology"])
        .output()
        .unwrap();
    assert!(declared.status.success());
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let names = chat_delete_worker::contract::Names::new(&ns);
    let channel = connection.create_channel().await.unwrap();
    let (_, events) = private_queue(&channel, Some(&names.events_exchange())).await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    const COUNT: usize = 20;
    let body = format!(
        r#"{{"number": "5511999999999", "pad": "{}"}}"#,
        "x".repeat(20 << 20)
    );
    for i in 0..COUNT {
        for (instance, prefix) in [("alpha", "big"), ("nobody", "unknown")] {
            let id = format!("{prefix}-{i}");
            let exchange = names.commands_exchange();
            publish_confirmed(&channel, &exchange, instance, &id, body.as_bytes()).await;
        }
    }
    let mut worker = Process::new(bin)
        .args(["--config", path.to_str().unwrap(), "run"])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let all = events
        .wait_until("every oversized answer", |all| all.len() >= 2 * COUNT)
        .await;
    let status_of = |prefix: &str| {
        all.iter()
            .filter(|d| message_id(d).is_some_and(|id| id.starts_with(prefix)))
            .map(status)
            .collect::<Vec<_>>()
    };
    assert_eq!(status_of("big-"), vec![400; COUNT]);
    assert_eq!(status_of("unknown-"), vec![404; COUNT]);
    // Ordinary commands after them bring the queue back to its full prefetch. RabbitMQ applies
    // `basic.qos` only to consumers started after it: the defect was a prefetch stuck at 1
    // (570 commands/s instead of 10,000 in the bench).
    for i in 0..200 {
        let id = format!("ok-{i}");
        publish_confirmed(&channel, &names.commands_exchange(), "alpha", &id, OK).await;
    }
    events
        .wait_until("the ordinary answers", |all| all.len() >= 2 * COUNT + 200)
        .await;
    let consumers = rabbitmqctl(&["list_consumers", "-q", "queue_name", "prefetch_count"]);
    let alpha = names.instance_queue("alpha");
    let prefetch: Vec<&str> = consumers
        .lines()
        .filter_map(|l| l.strip_prefix(alpha.as_str())?.split_whitespace().next())
        .collect();
    assert_eq!(prefetch, ["64"], "{consumers}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", worker.id())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let _ = worker.kill();
    let _ = worker.wait();
    assert!(
        peak_kib < 256 * 1024,
        "peak RSS {} MiB with 20 MiB bodies",
        peak_kib / 1024
    );
    for queue in [
        names.instance_queue("alpha"),
        names.unrouted_queue(),
        names.parked_queue(),
        names.dead_queue(),
        names.retry_queue(50),
    ] {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}
