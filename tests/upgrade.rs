//! Upgrading a deployment whose queues an earlier version declared: the worker refuses to
//! start and names the one command; `topology --upgrade` keeps every message (a parked copy
//! loses its clear token on the way into the parking stream), and the worker then runs.

mod common;

use std::process::Command as Process;

use common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ExchangeKind};

const TOKEN: &str = "secret-tok-upgrade";
const OK: &[u8] = br#"{"number": "5511999999999"}"#;

fn args(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert((*key).into(), value.clone());
    }
    table
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// The queues as the previous version declared them, each holding a message.
async fn earlier_version(channel: &Channel, ns: &str) {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let unrouted = format!("{ns}.commands.unrouted");
    channel
        .exchange_declare(
            unrouted.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .exchange_declare(
            format!("{ns}.commands").into(),
            ExchangeKind::Direct,
            durable,
            args(&[("alternate-exchange", text(&unrouted))]),
        )
        .await
        .unwrap();
    let parked = format!("{ns}.delete.parked");
    let old_dead_letter = [
        ("x-queue-type", text("quorum")),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text(&parked)),
        ("x-delivery-limit", AMQPValue::LongLongInt(20)),
    ];
    let queue_durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(
            parked.as_str().into(),
            queue_durable,
            args(&[("x-queue-type", text("quorum"))]),
        )
        .await
        .unwrap();
    let mut instance = old_dead_letter.to_vec();
    instance.push(("x-single-active-consumer", AMQPValue::Boolean(true)));
    let alpha = format!("{ns}.delete.alpha");
    channel
        .queue_declare(alpha.as_str().into(), queue_durable, args(&instance))
        .await
        .unwrap();
    channel
        .queue_bind(
            alpha.as_str().into(),
            format!("{ns}.commands").into(),
            "alpha".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            format!("{ns}.delete.unrouted").into(),
            queue_durable,
            args(&old_dead_letter),
        )
        .await
        .unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let command = |id: &str, extra: &[(&str, AMQPValue)]| {
        let mut headers = args(extra);
        headers.insert("token".into(), text(TOKEN));
        BasicProperties::default()
            .with_message_id(id.into())
            .with_delivery_mode(2)
            .with_headers(headers)
    };
    for (queue, props) in [
        (alpha.clone(), command("waiting-1", &[])),
        (
            parked.clone(),
            command(
                "parked-old",
                &[
                    ("x-parked-status", AMQPValue::LongInt(503)),
                    ("x-original-routing-key", text("alpha")),
                ],
            ),
        ),
    ] {
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                OK,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

/// A config for a fresh namespace, written to a file in `dir`.
fn config_file(dir: &tempfile::TempDir) -> (String, String, std::path::PathBuf) {
    let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let toml = format!(
        "[broker]\nurl = \"{}\"\nnamespace = \"{ns}\"\n[http]\nport = 0\nbind = \"127.0.0.1\"\n[store]\npath = \"{}\"\n[retry]\nbroker_delays_ms = [50]\n[pacing]\ndeletes_per_minute = \"unlimited\"\n[instances.alpha]\nkind = \"simulated\"\ntoken_sha256 = \"{}\"\n",
        amqp_url(),
        dir.path().display(),
        hash(TOKEN),
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &toml).unwrap();
    (ns, toml, path)
}

fn topology(path: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let out = Process::new(env!("CARGO_BIN_EXE_chat-delete-worker"))
        .args(["--config", path.to_str().unwrap(), "topology"])
        .args(extra)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test]
async fn an_earlier_topology_is_upgraded_by_one_command_keeping_every_message() {
    let dir = tempfile::tempdir().unwrap();
    let (ns, toml, path) = config_file(&dir);
    let connection =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    earlier_version(&channel, &ns).await;

    let bin = env!("CARGO_BIN_EXE_chat-delete-worker");
    let refused = Process::new(bin)
        .args(["--config", path.to_str().unwrap(), "run"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("topology --upgrade"), "{stderr}");

    let (upgraded, stdout) = topology(&path, &["--upgrade"]);
    assert!(upgraded, "{stdout}");
    assert!(
        stdout.contains(&format!("upgraded {ns}.delete.alpha: 1 message(s) kept")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("upgraded {ns}.delete.parked: 1 message(s) kept")),
        "{stdout}"
    );

    let config = chat_delete_worker::config::Config::from_toml(&toml).unwrap();
    let w = TestWorker::start_with(config, ns, dir).await;
    assert_eq!(status(&w.events.by_id("waiting-1").await), 200);
    let parked = chat_delete_worker::cli::parked::list(&w.connection, &w.names, 10)
        .await
        .unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].idempotency_id.as_deref(), Some("parked-old"));
    let moved = chat_delete_worker::cli::parked::replay(&w.connection, &w.names, &[])
        .await
        .unwrap();
    assert_eq!(moved, 1);
    let answer = w.events.by_id("parked-old").await;
    assert_eq!(
        status(&answer),
        200,
        "its token became a proof that opens it"
    );
    let _ = channel.close(200, "done".into()).await;
    w.stop().await;
}

/// An upgrade stopped after the queue was declared anew but before its messages were moved
/// back (here: the holding queue it leaves, with a command in it) finishes on the next run.
#[tokio::test]
async fn an_interrupted_upgrade_finishes_when_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let (ns, _, path) = config_file(&dir);
    let (declared, out) = topology(&path, &[]);
    assert!(declared, "{out}");
    let connection =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let alpha = format!("{ns}.delete.alpha");
    let holding = format!("{alpha}.upgrading");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(
            holding.as_str().into(),
            durable,
            args(&[("x-queue-type", text("quorum"))]),
        )
        .await
        .unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    channel
        .basic_publish(
            "".into(),
            holding.as_str().into(),
            BasicPublishOptions::default(),
            OK,
            BasicProperties::default().with_message_id("held-1".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let (upgraded, stdout) = topology(&path, &["--upgrade"]);
    assert!(upgraded, "{stdout}");
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare(alpha.as_str().into(), passive, FieldTable::default())
        .await
        .unwrap();
    assert_eq!(
        queue.message_count(),
        1,
        "the held command is back: {stdout}"
    );
    let gone = channel
        .queue_declare(holding.as_str().into(), passive, FieldTable::default())
        .await;
    assert!(gone.is_err(), "the holding queue is removed");

    let n = chat_delete_worker::contract::Names::new(&ns);
    let cleanup = connection.create_channel().await.unwrap();
    for queue in [
        alpha,
        holding,
        n.unrouted_queue(),
        n.parked_queue(),
        n.dead_queue(),
        n.retry_queue(50),
    ] {
        let _ = cleanup
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in [
        n.commands_exchange(),
        n.unrouted_exchange(),
        n.events_exchange(),
        n.dead_exchange(),
        n.retry_exchange(50),
    ] {
        let _ = cleanup
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}
