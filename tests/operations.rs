//! Operating the worker: metrics after known traffic, health endpoints, SIGTERM under load,
//! and the bulk clean-up CLI, using the real binary where a user would.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

const TOKEN: &str = "secret-tok-ops";

#[tokio::test]
async fn metrics_and_health_reflect_known_traffic() {
    let cfg = format!(
        "[pacing]\ndeletes_per_minute = \"unlimited\"\n[instances.alpha]\nkind = \"simulated\"\ntoken_sha256 = \"{}\"\n",
        hash(TOKEN)
    );
    let w = TestWorker::start(&cfg).await;
    let addr = w.http_addr.unwrap();
    let before = http_get(addr, "/metrics").await.unwrap();
    for i in 0..3 {
        w.publish(Command::new(
            "alpha",
            &format!("m-ok-{i}"),
            TOKEN,
            br#"{"number": "5511999999999"}"#,
        ))
        .await;
    }
    w.publish(Command::new(
        "alpha",
        "m-bad",
        "wrong",
        br#"{"number": "5511999999999"}"#,
    ))
    .await;
    w.events.wait_until("4 results", |all| all.len() >= 4).await;
    w.publish(Command::new(
        "alpha",
        "m-ok-0",
        TOKEN,
        br#"{"number": "5511999999999"}"#,
    ))
    .await;
    w.events.wait_until("5 results", |all| all.len() >= 5).await;

    // The results are confirmed before the counters move on; wait for the scrape to show them.
    let ok = r#"chat_delete_commands_completed_total{status="200",outcome="deleted"}"#;
    let deadline = tokio::time::Instant::now() + WAIT;
    let after = loop {
        let text = http_get(addr, "/metrics").await.unwrap();
        if metric(&text, ok) - metric(&before, ok) >= 4.0 || tokio::time::Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let delta = |series: &str| metric(&after, series) - metric(&before, series);
    assert_eq!(delta(ok), 4.0, "3 deletes and 1 replay answered with 200");
    assert_eq!(
        delta(r#"chat_delete_commands_completed_total{status="401",outcome="invalid_token"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"chat_delete_commands_received_total{queue="instance"}"#),
        5.0
    );
    assert_eq!(delta("chat_delete_replays_total"), 1.0);
    // The gauge is process-wide and other tests' workers share this process: its value is
    // checked through /readyz below; here, that it is exported.
    assert!(after.contains("# TYPE chat_delete_broker_connected gauge"));
    assert!(after.contains("# HELP chat_delete_command_duration_seconds"));
    assert!(after.contains(r#"chat_delete_stage_duration_seconds_count{stage="session_delete"}"#));
    assert!(after.contains(r#"chat_delete_stage_duration_seconds_count{stage="publish_confirm"}"#));
    assert!(!after.contains(TOKEN));
    // The instance gauge is refreshed every second.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = http_get(addr, "/metrics").await.unwrap();
        if metric(
            &text,
            r#"chat_delete_instance_connected{wa_instance="alpha"}"#,
        ) == 1.0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "instance gauge never showed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        http_get(addr, "/healthz")
            .await
            .unwrap()
            .starts_with("HTTP/1.1 200")
    );
    let ready = http_get(addr, "/readyz").await.unwrap();
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(
        ready.contains("broker_connected=true consuming=true store_reachable=true"),
        "{ready}"
    );
    w.stop().await;
}

const BIN: &str = env!("CARGO_BIN_EXE_chat-delete-worker");

fn write_config(dir: &std::path::Path, ns: &str, latency_ms: u64) -> std::path::PathBuf {
    let text = format!(
        r#"[worker]
concurrency_per_instance = 8
shutdown_grace_ms = 20000
[broker]
url = "{url}"
namespace = "{ns}"
prefetch = 16
[http]
enabled = false
[store]
path = "{dir}"
[pacing]
deletes_per_minute = "unlimited"
[instances.alpha]
kind = "simulated"
token_sha256 = "{hash}"
simulated = {{ latency_ms = {latency_ms}, effects_log = "{dir}/effects.log" }}
"#,
        url = amqp_url(),
        dir = dir.display(),
        hash = hash(TOKEN),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn declare(config: &std::path::Path) {
    let status = tokio::process::Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "topology"])
        .stdout(Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success());
}

async fn events_listener(ns: &str) -> (Connection, Results) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let (_, results) = private_queue(&channel, Some(&format!("{ns}.events"))).await;
    (connection, results)
}

#[tokio::test]
async fn sigterm_under_load_finishes_in_flight_work_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let config = write_config(dir.path(), &ns, 20);
    declare(&config).await;
    let (connection, results) = events_listener(&ns).await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let n = 300;
    for i in 0..n {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("token"),
            AMQPValue::LongString(TOKEN.into()),
        );
        let props = BasicProperties::default()
            .with_message_id(format!("s-{i}").into())
            .with_headers(headers);
        let body = format!(r#"{{"number": "55119{i:08}"}}"#);
        channel
            .basic_publish(
                format!("{ns}.commands").into(),
                "alpha".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await
            .unwrap();
    }
    channel.wait_for_confirms().await.unwrap();

    let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
    let mut worker = tokio::process::Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "--log-json", "run"])
        // Successes are logged at debug.
        .env("RUST_LOG", "info,chat_delete_worker=debug")
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    results
        .wait_until("some results", |all| all.len() >= 40)
        .await;
    let pid = worker.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(WAIT, worker.wait())
        .await
        .expect("exits within the grace period")
        .unwrap();
    assert!(status.success(), "exit 0 after SIGTERM: {status}");
    let answered_at_stop = results.all().len();
    assert!(answered_at_stop < n, "stopped under load");
    let deletes_at_stop = std::fs::read_to_string(dir.path().join("effects.log"))
        .unwrap()
        .lines()
        .count();

    // The rest is handed back to the queue and done by the next run.
    let log = std::fs::File::create(dir.path().join("worker2.log")).unwrap();
    let mut again = tokio::process::Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "run"])
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let all = results
        .wait_until("every command answered", |all| {
            let ids: std::collections::HashSet<_> = all.iter().filter_map(message_id).collect();
            ids.len() == n
        })
        .await;
    again.start_kill().unwrap();
    let _ = again.wait().await;
    assert!(all.iter().all(|d| status_of(d) == 200));
    assert_eq!(
        all.len(),
        n,
        "one result per command: nothing in flight was dropped or redone"
    );
    let effects = std::fs::read_to_string(dir.path().join("effects.log")).unwrap();
    let mut chats: Vec<&str> = effects
        .lines()
        .map(|l| l.split_once(' ').unwrap().1)
        .collect();
    assert_eq!(
        chats.len(),
        n,
        "each chat deleted once ({deletes_at_stop} before the stop)"
    );
    chats.sort_unstable();
    chats.dedup();
    assert_eq!(chats.len(), n);
    let first_log = std::fs::read_to_string(dir.path().join("worker.log")).unwrap();
    assert!(first_log.contains("SIGTERM received"), "{first_log}");
    assert!(first_log.contains("Worker stopped."), "{first_log}");
    // JSON lines; every line about a command names its id, instance and attempt.
    let answered: Vec<serde_json::Value> = first_log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON log line"))
        .filter(|l| l["message"] == "Command answered.")
        .collect();
    assert!(!answered.is_empty() && answered.len() >= answered_at_stop);
    for line in answered {
        let span = &line["span"];
        assert!(
            span["idempotency_id"].as_str().unwrap().starts_with("s-"),
            "{line}"
        );
        assert_eq!(span["instance"], "alpha");
        assert_eq!(span["attempt"], 1);
    }
    cleanup(&connection, &ns).await;
}

fn status_of(d: &Delivery) -> i64 {
    status(d)
}

async fn cleanup(connection: &Connection, ns: &str) {
    let ch = connection.create_channel().await.unwrap();
    for q in [
        "delete.alpha",
        "delete.unrouted",
        "delete.parked",
        "delete.dead",
        "delete.retry.5s",
        "delete.retry.30s",
        "delete.retry.2m",
        "results.june",
    ] {
        let _ = ch
            .queue_delete(format!("{ns}.{q}").into(), QueueDeleteOptions::default())
            .await;
    }
    for e in [
        "commands",
        "commands.unrouted",
        "events",
        "dead",
        "retry.5s",
        "retry.30s",
        "retry.2m",
    ] {
        let _ = ch
            .exchange_delete(format!("{ns}.{e}").into(), ExchangeDeleteOptions::default())
            .await;
    }
}

#[tokio::test]
async fn bulk_cleanup_from_a_csv_file_to_a_tally_never_deletes_twice() {
    let dir = tempfile::tempdir().unwrap();
    let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let config = write_config(dir.path(), &ns, 0);
    declare(&config).await;
    let mut worker = tokio::process::Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "run"])
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let csv = dir.path().join("chats.csv");
    std::fs::write(
        &csv,
        "name,phone\nAna,5511999990001\n\"Silva, B\",+55 11 99999-0002\nbad,not-a-number\n",
    )
    .unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let cli = |args: &[&str]| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["--config", config.to_str().unwrap()]).args(args);
        cmd
    };
    let publish = |label: &str| {
        let out = cli(&[
            "publish",
            "-i",
            "alpha",
            "-b",
            "june",
            "--column",
            "phone",
            "--token-file",
            token_file.to_str().unwrap(),
            csv.to_str().unwrap(),
        ])
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "{label}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stderr).unwrap()
    };
    let said = publish("first");
    assert!(said.contains("published 3 command(s)"), "{said}");
    assert!(!said.contains(TOKEN));
    let out = tokio::task::spawn_blocking({
        let cmd = cli(&["results", "-b", "june", "--expect", "3", "--json"]);
        move || {
            let mut cmd = cmd;
            cmd.output().unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed command makes the exit non-zero"
    );
    let tally: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(tally["answered"], 3);
    assert_eq!(tally["by_status"]["200"], 2);
    assert_eq!(tally["by_status"]["400"], 1);
    assert_eq!(tally["failures"][0]["message"], "Invalid number");

    // The same batch again: answered from memory, nothing deleted twice.
    publish("second");
    let effects = dir.path().join("effects.log");
    let out = tokio::task::spawn_blocking({
        let cmd = cli(&["results", "-b", "june", "--idle-secs", "3", "--json"]);
        move || {
            let mut cmd = cmd;
            cmd.output().unwrap()
        }
    })
    .await
    .unwrap();
    let tally: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(tally["answered"], 3);
    assert_eq!(tally["replayed"], 3);
    assert_eq!(std::fs::read_to_string(effects).unwrap().lines().count(), 2);
    worker.start_kill().unwrap();
    let _ = worker.wait().await;
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    cleanup(&connection, &ns).await;
}

#[tokio::test]
async fn a_conflicting_topology_stops_the_worker_with_a_clear_error() {
    let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    // The instance queue already exists as a classic queue: a quorum declaration must fail.
    channel
        .queue_declare(
            format!("{ns}.delete.alpha").into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = chat_delete_worker::config::Config::from_toml(&format!(
        "[broker]\nurl = \"{}\"\nnamespace = \"{ns}\"\n[http]\nenabled = false\n[store]\npath = \"{}\"\n[instances.alpha]\nkind = \"simulated\"\ntoken_sha256 = \"{}\"\n",
        amqp_url(),
        dir.path().display(),
        hash(TOKEN)
    ))
    .unwrap();
    let result = tokio::time::timeout(
        WAIT,
        chat_delete_worker::run(config, std::future::pending(), |_| {}),
    )
    .await
    .expect("the worker gives up instead of retrying forever");
    let error = result.unwrap_err().to_string();
    assert!(error.contains("refused the topology"), "{error}");
    cleanup(&connection, &ns).await;
}
