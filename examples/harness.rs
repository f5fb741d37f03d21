//! Crash and broker-restart harness (run through `scripts/crash-harness` and
//! `scripts/broker-restart-harness`).
//!
//! Preloads thousands of commands, each for its own chat, over several simulated instances; runs
//! the worker as a child process; disrupts it (SIGKILL and restart, or broker connections
//! closed / the broker app restarted) at random moments; waits until every command is answered;
//! then reads the simulated sessions' effect logs and the results and prints
//! `lost=<n> double_effects=<n> reexecuted=<n> kills=<n>`. Exits non-zero unless lost and
//! double_effects are 0 and the queues are drained.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rand::Rng;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

struct Args {
    mode: String,
    commands: usize,
    instances: usize,
    disruptions: usize,
    concurrency: usize,
    latency_ms: u64,
    worker: PathBuf,
    amqp: String,
}

fn parse_args() -> Args {
    let mut args = Args {
        mode: "crash".into(),
        commands: 4000,
        instances: 4,
        disruptions: 5,
        concurrency: 8,
        latency_ms: 0,
        worker: PathBuf::from("target/debug/chat-delete-worker"),
        amqp: std::env::var("AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--mode" => args.mode = value(),
            "--commands" => args.commands = value().parse().expect("number"),
            "--instances" => args.instances = value().parse().expect("number"),
            "--disruptions" | "--kills" => args.disruptions = value().parse().expect("number"),
            "--concurrency" => args.concurrency = value().parse().expect("number"),
            "--latency-ms" => args.latency_ms = value().parse().expect("number"),
            "--worker" => args.worker = PathBuf::from(value()),
            "--quick" => {
                args.commands = 1500;
                args.disruptions = 3;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        matches!(args.mode.as_str(), "crash" | "broker-restart"),
        "--mode crash|broker-restart"
    );
    if args.latency_ms == 0 {
        // Slow enough that the run spans the disruptions (a broker restart takes seconds).
        args.latency_ms = if args.mode == "crash" { 2 } else { 100 };
    }
    args
}

fn chat_of(i: usize) -> String {
    format!("55{:011}@s.whatsapp.net", 10_000_000_000u64 + i as u64)
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let dir = tempfile::tempdir().expect("temp dir");
    let ns = format!("harness{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let token = "harness-token";
    let hash = hex::encode(chat_delete_worker::config::TokenHash::of(token.as_bytes()).0);
    let config = write_config(dir.path(), &ns, &args, &hash);
    let names = chat_delete_worker::contract::Names::new(&ns);
    let instances: Vec<String> = (0..args.instances).map(|i| format!("inst{i}")).collect();

    // Declare the topology through the worker itself, plus a durable results queue.
    let status = Command::new(&args.worker)
        .args(["--config", config.to_str().unwrap(), "topology"])
        .stdout(Stdio::null())
        .status()
        .await
        .expect("run the worker");
    assert!(status.success(), "topology declaration failed");
    let connection = connect(&args.amqp).await;
    let channel = connection.create_channel().await.unwrap();
    let results_queue = format!("{ns}.harness.results");
    let mut qargs = FieldTable::default();
    qargs.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            results_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            qargs,
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            results_queue.as_str().into(),
            names.events_exchange().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    // Preload every command, confirmed.
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..args.commands {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("token"),
            AMQPValue::LongString(token.into()),
        );
        let props = BasicProperties::default()
            .with_message_id(format!("h-{i}").into())
            .with_delivery_mode(2)
            .with_headers(headers);
        let body = format!(r#"{{"number": "{}"}}"#, chat_of(i));
        channel
            .basic_publish(
                names.commands_exchange().into(),
                instances[i % instances.len()].as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await
            .unwrap();
    }
    channel.wait_for_confirms().await.unwrap();
    let _ = connection.close(200, "preloaded".into()).await;
    eprintln!(
        "harness: {} commands preloaded over {} instances ({})",
        args.commands, args.instances, args.mode
    );

    let log = dir.path().join("worker.log");
    let mut worker = spawn_worker(&args.worker, &config, &log);
    let mut rng = rand::rng();
    let mut disruptions = 0;
    let started = Instant::now();
    while disruptions < args.disruptions {
        sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        match args.mode.as_str() {
            "crash" => {
                worker.start_kill().expect("SIGKILL");
                let _ = worker.wait().await;
                worker = spawn_worker(&args.worker, &config, &log);
            }
            _ if disruptions % 2 == 0 => rabbitmqctl(&["close_all_connections", "harness"]).await,
            _ => {
                rabbitmqctl(&["stop_app"]).await;
                rabbitmqctl(&["start_app"]).await;
                rabbitmqctl(&["await_startup"]).await;
            }
        }
        disruptions += 1;
        eprintln!(
            "harness: disruption {disruptions} at {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }

    // Every command answered (bounded), then read everything back.
    let results = collect_results(&args.amqp, &results_queue, args.commands).await;
    let drained = wait_drained(&args.amqp, &names, &instances).await;
    worker.start_kill().ok();
    let _ = worker.wait().await;

    let mut by_id: HashMap<String, Vec<(i64, String)>> = HashMap::new();
    for (id, time_us, key) in &results {
        by_id
            .entry(id.clone())
            .or_default()
            .push((*time_us, key.clone()));
    }
    let mut deletes: HashMap<String, Vec<i64>> = HashMap::new();
    for instance in &instances {
        let text = std::fs::read_to_string(dir.path().join(format!("effects-{instance}.log")))
            .unwrap_or_default();
        for line in text.lines() {
            let (time, chat) = line.split_once(' ').expect("time chat");
            deletes
                .entry(chat.to_owned())
                .or_default()
                .push(time.parse().expect("time"));
        }
    }
    let mut lost = 0;
    let mut double_effects = 0;
    let mut reexecuted = 0;
    for i in 0..args.commands {
        let id = format!("h-{i}");
        let Some(answers) = by_id.get(&id) else {
            lost += 1;
            continue;
        };
        let distinct: HashSet<&String> = answers.iter().map(|(_, k)| k).collect();
        let first_result = answers.iter().map(|(t, _)| *t).min().unwrap();
        let times = deletes.get(&chat_of(i)).cloned().unwrap_or_default();
        let late = times.iter().filter(|t| **t > first_result).count();
        if distinct.len() > 1 || late > 0 {
            double_effects += 1;
            eprintln!(
                "harness: double effect on {id}: results {distinct:?}, {late} delete(s) after the first result"
            );
        } else if times.len() > 1 {
            reexecuted += 1;
        }
    }
    let in_flight_limit = args.concurrency * args.instances;
    eprintln!(
        "harness: {} results for {} commands in {:.1}s; queues drained: {drained}; re-executions allowed up to {}",
        results.len(),
        args.commands,
        started.elapsed().as_secs_f64(),
        args.disruptions * in_flight_limit
    );
    cleanup(&args.amqp, &names, &instances, &results_queue).await;
    println!(
        "lost={lost} double_effects={double_effects} reexecuted={reexecuted} kills={disruptions}"
    );
    let ok = lost == 0
        && double_effects == 0
        && drained
        && reexecuted <= args.disruptions * in_flight_limit;
    std::process::exit(if ok { 0 } else { 1 });
}

fn write_config(dir: &Path, ns: &str, args: &Args, hash: &str) -> PathBuf {
    let mut toml = format!(
        r#"[worker]
concurrency_per_instance = {concurrency}
shutdown_grace_ms = 2000
[broker]
url = "{amqp}"
namespace = "{ns}"
prefetch = {concurrency}
[http]
enabled = false
[store]
path = "{dir}"
[pacing]
deletes_per_minute = "unlimited"
[retry]
in_process_attempts = 2
in_process_min_delay_ms = 10
in_process_max_delay_ms = 50
broker_delays_ms = [200, 1000]
"#,
        concurrency = args.concurrency,
        amqp = args.amqp,
        dir = dir.display(),
    );
    for i in 0..args.instances {
        toml.push_str(&format!(
            "[instances.inst{i}]\nkind = \"simulated\"\ntoken_sha256 = \"{hash}\"\nsimulated = {{ latency_ms = {latency}, effects_log = \"{}\" }}\n",
            dir.join(format!("effects-inst{i}.log")).display(),
            latency = args.latency_ms,
        ));
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

fn spawn_worker(bin: &Path, config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(bin)
        .args(["--config", config.to_str().unwrap(), "run"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start the worker")
}

async fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .await
        .expect("rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

async fn connect(url: &str) -> Connection {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match Connection::connect(url, ConnectionProperties::default()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("harness: broker not reachable yet ({e}); retrying");
                sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("broker unreachable: {e}"),
        }
    }
}

/// Reads results until every id has one (or 5 minutes pass): (id, event time in µs, status+body).
async fn collect_results(url: &str, queue: &str, expected: usize) -> Vec<(String, i64, String)> {
    let mut results = vec![];
    let mut answered = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while answered.len() < expected && Instant::now() < deadline {
        let connection = connect(url).await;
        let channel = connection.create_channel().await.unwrap();
        channel
            .basic_qos(1000, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "harness".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        while answered.len() < expected {
            let next = match timeout(
                deadline.saturating_duration_since(Instant::now()),
                consumer.next(),
            )
            .await
            {
                Ok(Some(Ok(d))) => d,
                _ => break,
            };
            let headers = next.properties.headers().clone().unwrap_or_default();
            let id = next
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            let time = match headers.inner().get("cloudEvents_time") {
                Some(AMQPValue::LongString(s)) => {
                    chrono::DateTime::parse_from_rfc3339(&String::from_utf8_lossy(s.as_bytes()))
                        .map(|t| t.timestamp_micros())
                        .unwrap_or(i64::MAX)
                }
                _ => i64::MAX,
            };
            let status = match headers.inner().get("status") {
                Some(AMQPValue::LongInt(s)) => *s,
                _ => 0,
            };
            results.push((
                id.clone(),
                time,
                format!("{status} {}", String::from_utf8_lossy(&next.data)),
            ));
            answered.insert(id);
            let _ = next.ack(BasicAckOptions::default()).await;
        }
        let _ = connection.close(200, "done".into()).await;
    }
    results
}

/// Whether every instance queue is empty (bounded wait; parked commands do not count).
async fn wait_drained(
    url: &str,
    names: &chat_delete_worker::contract::Names,
    instances: &[String],
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let connection = connect(url).await;
        let mut empty = true;
        for instance in instances {
            let channel = connection.create_channel().await.unwrap();
            let q = channel
                .queue_declare(
                    names.instance_queue(instance).into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            empty &= q.message_count() == 0;
        }
        let _ = connection.close(200, "checked".into()).await;
        if empty || Instant::now() > deadline {
            return empty;
        }
        sleep(Duration::from_millis(200)).await;
    }
}

async fn cleanup(
    url: &str,
    names: &chat_delete_worker::contract::Names,
    instances: &[String],
    results: &str,
) {
    let connection = connect(url).await;
    let channel = connection.create_channel().await.unwrap();
    let mut queues = vec![
        names.unrouted_queue(),
        names.parked_queue(),
        results.to_owned(),
    ];
    queues.extend(instances.iter().map(|i| names.instance_queue(i)));
    queues.extend([200, 1000].iter().map(|d| names.retry_queue(*d)));
    for q in queues {
        let _ = channel
            .queue_delete(q.into(), QueueDeleteOptions::default())
            .await;
    }
    let mut exchanges = vec![
        names.commands_exchange(),
        names.unrouted_exchange(),
        names.events_exchange(),
    ];
    exchanges.extend([200, 1000].iter().map(|d| names.retry_exchange(*d)));
    for e in exchanges {
        let _ = channel
            .exchange_delete(e.into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "cleaned".into()).await;
}
