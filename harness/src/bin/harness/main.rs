//! Crash, broker-restart, slow and store-fault harness (run through `scripts/crash-harness`
//! and `scripts/broker-restart-harness`).
//!
//! Preloads thousands of commands, each for its own chat, over several simulated instances; runs
//! the worker as a child process; disrupts it at random moments; waits until every delivery is
//! answered; then reads the simulated sessions' effect logs and the results and prints
//! `lost=<n> double_effects=<n> reexecuted=<n> kills=<n>`. Exits non-zero unless lost and
//! double_effects are 0 and the queues are drained. Modes:
//!
//! - `crash`: SIGKILL and restart the worker.
//! - `broker-restart`: close the broker's connections, or restart the broker app.
//! - `slow`: deletes take longer than the claim's lease, and a duplicate of every id is
//!   published while the originals wait; the worker is SIGKILLed and restarted too.
//! - `store-faults`: the Redis store (a private `redis-server` with an append-only file, at its
//!   memory limit with `volatile-lru`, kept under pressure by keys with a TTL) is stopped and
//!   restarted; duplicates as in `slow`.
//! - `scale`: several workers share the instances (see [`scale`]).

mod broker;
mod scale;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use rand::Rng;
use redis::AsyncCommands;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Crash,
    BrokerRestart,
    Slow,
    StoreFaults,
    Scale,
}

struct Args {
    mode: Mode,
    commands: usize,
    instances: usize,
    disruptions: usize,
    concurrency: usize,
    latency_ms: u64,
    worker: PathBuf,
    amqp: String,
    /// `--cluster` (scale mode): the 3-node cluster of `scripts/cluster` and shared sessions.
    cluster: Option<Cluster>,
}

/// Where the cluster run's parts are, from the environment `scripts/scale-harness` sets.
struct Cluster {
    /// The other nodes, `host:port` (the first is `AMQP_URL`).
    nodes: Vec<String>,
    management_url: String,
    postgres_url: String,
    /// `scripts/cluster`, to stop and start nodes.
    script: PathBuf,
}

impl Cluster {
    fn from_env() -> Self {
        let var =
            |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("--cluster needs {name}"));
        Self {
            nodes: var("HARNESS_CLUSTER_NODES")
                .split(',')
                .map(str::to_owned)
                .collect(),
            management_url: var("HARNESS_MANAGEMENT_URL"),
            postgres_url: var("HARNESS_POSTGRES_URL"),
            script: PathBuf::from(var("HARNESS_CLUSTER_SCRIPT")),
        }
    }
}

/// Claims last this long in `slow` mode, shorter than a delete.
const SLOW_LEASE_SECS: u64 = 2;

fn parse_args() -> Args {
    let mut mode = Mode::Crash;
    let mut quick = false;
    let mut cluster = false;
    let mut set: HashMap<String, String> = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--mode" => {
                mode = match value().as_str() {
                    "crash" => Mode::Crash,
                    "broker-restart" => Mode::BrokerRestart,
                    "slow" => Mode::Slow,
                    "store-faults" => Mode::StoreFaults,
                    "scale" => Mode::Scale,
                    other => {
                        panic!("--mode crash|broker-restart|slow|store-faults|scale, not {other}")
                    }
                }
            }
            "--slow" => mode = Mode::Slow,
            "--store-faults" => mode = Mode::StoreFaults,
            "--quick" => quick = true,
            "--cluster" => cluster = true,
            "--commands" | "--instances" | "--disruptions" | "--kills" | "--concurrency"
            | "--latency-ms" | "--worker" => {
                set.insert(
                    flag.trim_start_matches('-').replace("kills", "disruptions"),
                    value(),
                );
            }
            other => panic!("unknown argument {other}"),
        }
    }
    // (commands, disruptions, latency, concurrency) per mode, full and --quick.
    let (commands, disruptions, latency_ms, concurrency) = match (mode, quick) {
        (Mode::Crash, false) => (4000, 5, 2, 8),
        (Mode::Crash, true) => (1500, 3, 2, 8),
        // Slow enough that the run spans the disruptions (a broker restart takes seconds).
        (Mode::BrokerRestart, false) => (4000, 5, 100, 8),
        (Mode::BrokerRestart, true) => (1500, 3, 100, 8),
        (Mode::Slow, false) => (600, 4, 3_000, 16),
        (Mode::Slow, true) => (160, 2, 3_000, 16),
        (Mode::StoreFaults, false) => (4000, 4, 20, 8),
        (Mode::StoreFaults, true) => (1200, 2, 20, 8),
        // Disruptions are rounds of SIGKILL, SIGSTOP, SIGTERM and a Redis outage; commands
        // come in at a steady rate meanwhile (the count is only a ceiling).
        (Mode::Scale, false) => (100_000, 2, 20, 4),
        (Mode::Scale, true) => (100_000, 1, 20, 4),
    };
    let instances = if mode == Mode::Scale { 60 } else { 4 };
    let get =
        |key: &str, default: usize| set.get(key).map_or(default, |v| v.parse().expect("number"));
    Args {
        mode,
        commands: get("commands", commands),
        instances: get("instances", instances),
        disruptions: get("disruptions", disruptions),
        concurrency: get("concurrency", concurrency),
        latency_ms: get("latency-ms", latency_ms as usize) as u64,
        worker: set.get("worker").map_or_else(
            || PathBuf::from("target/debug/chat-delete-worker"),
            PathBuf::from,
        ),
        amqp: std::env::var("AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        cluster: cluster.then(Cluster::from_env),
    }
}

impl Args {
    /// Whether a duplicate of every id is published during the run.
    fn duplicates(&self) -> bool {
        matches!(self.mode, Mode::Slow | Mode::StoreFaults)
    }
}

fn chat_of(i: usize) -> String {
    format!("55{:011}@s.whatsapp.net", 10_000_000_000u64 + i as u64)
}

const TOKEN: &str = "harness-token";

#[tokio::main]
async fn main() {
    let args = std::sync::Arc::new(parse_args());
    let ns = format!("harness{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    // Its instances' queues and the shared ones (scale: a neighbour's too, and one more).
    let queues = match args.mode {
        Mode::Scale => 2 * (args.instances + 8),
        _ => args.instances + 7,
    };
    if let Some(why) = broker::blocker(&args, queues).await {
        eprintln!("harness: not starting: {why}");
        println!(
            "{}",
            unknown_figures(&args, "the broker is short of file handles")
        );
        std::process::exit(2);
    }
    let run = {
        let (args, ns) = (args.clone(), ns.clone());
        tokio::spawn(async move {
            match args.mode {
                Mode::Scale => scale::run(&args, args.disruptions, ns).await,
                _ => disruptions(&args, ns).await,
            }
        })
    };
    let outcome = run.await;
    // Whatever happened, nothing of the run stays on the broker; the figures come last.
    broker::sweep(&args, &ns).await;
    match outcome {
        Ok((figures, ok)) => {
            println!("{figures}");
            std::process::exit(if ok { 0 } else { 1 });
        }
        Err(error) => {
            let reason = match error.try_into_panic() {
                Ok(panic) => panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "the run panicked".into()),
                Err(error) => error.to_string(),
            };
            println!("{}", unknown_figures(&args, &reason));
            std::process::exit(1);
        }
    }
}

/// The figures line of a run that produced none, with why.
fn unknown_figures(args: &Args, reason: &str) -> String {
    let keys: &[&str] = match args.mode {
        Mode::Scale => &[
            "lost",
            "double_effects",
            "overlaps",
            "repeats",
            "failover_p99_s",
            "answer_stall_max_s",
            "answer_stall_p99_s",
            "imbalance",
            "kills",
            "refused",
            "stale_connects",
        ],
        _ => &["lost", "double_effects", "repeats", "reexecuted", "kills"],
    };
    let figures: Vec<String> = keys.iter().map(|k| format!("{k}=n/a")).collect();
    let reason = reason.lines().next().unwrap_or_default().replace('"', "'");
    format!("{} failed=\"{reason}\"", figures.join(" "))
}

/// A run of the worker under disruptions (every mode but scale): returns its figures line and
/// whether it passed.
async fn disruptions(args: &Args, ns: String) -> (String, bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let hash = hex::encode(chat_delete_worker::config::TokenHash::of(TOKEN.as_bytes()).0);
    let mut redis = match args.mode {
        Mode::StoreFaults => Some(Redis::start(dir.path()).await),
        _ => None,
    };
    let redis_url = redis.as_ref().map(Redis::url);
    let config = write_config(
        dir.path(),
        &ns,
        args,
        &hash,
        redis_url.as_deref(),
        args.instances,
    );
    let names = chat_delete_worker::contract::Names::new(&ns);
    let instances: Vec<String> = (0..args.instances).map(|i| format!("inst{i}")).collect();
    let results_queue = setup(args, &config, &names).await;
    publish_commands(&args.amqp, &names, &instances, 0..args.commands, "first").await;
    eprintln!(
        "harness: {} commands preloaded over {} instances ({:?})",
        args.commands, args.instances, args.mode
    );

    let log = dir.path().join("worker.log");
    let mut worker = spawn_worker(&args.worker, &config, &log);
    // Duplicates while the originals wait.
    let duplicates = args.duplicates().then(|| {
        publish_in_batches(args, &names, &instances, 50, "dup", || {
            Duration::from_millis(rand::rng().random_range(50..400))
        })
    });
    let pressure = redis
        .as_ref()
        .map(|r| tokio::spawn(keep_memory_pressed(r.url())));
    let started = Instant::now();
    let mut disruptions = 0;
    while disruptions < args.disruptions {
        let pause = rand::rng().random_range(300..1500);
        sleep(Duration::from_millis(pause)).await;
        match args.mode {
            Mode::Crash | Mode::Slow => {
                worker.start_kill().expect("SIGKILL");
                let _ = worker.wait().await;
                worker = spawn_worker(&args.worker, &config, &log);
            }
            Mode::BrokerRestart if disruptions % 2 == 0 => {
                rabbitmqctl(&["close_all_connections", "harness"]).await
            }
            Mode::BrokerRestart => {
                rabbitmqctl(&["stop_app"]).await;
                rabbitmqctl(&["start_app"]).await;
                rabbitmqctl(&["await_startup"]).await;
            }
            Mode::Scale => unreachable!("scale runs on its own"),
            Mode::StoreFaults => {
                let redis = redis.as_mut().expect("store-faults runs its own Redis");
                redis.stop().await;
                let down = rand::rng().random_range(500..3000);
                sleep(Duration::from_millis(down)).await;
                redis.start_server().await;
            }
        }
        disruptions += 1;
        eprintln!(
            "harness: disruption {disruptions} at {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
    if let Some(duplicates) = duplicates {
        duplicates.await.expect("duplicates published");
    }

    // Every delivery answered (bounded), then read everything back.
    let per_id = if args.duplicates() { 2 } else { 1 };
    let results = collect_results(&args.amqp, &results_queue, args.commands, per_id).await;
    let drained = wait_drained(&args.amqp, &names, &instances).await;
    worker.start_kill().ok();
    let _ = worker.wait().await;
    if let Some(pressure) = pressure {
        pressure.abort();
    }
    let evicted = match &redis {
        Some(redis) => redis.evicted_keys().await,
        None => 0,
    };

    let counts = account(args.commands, dir.path(), &instances, &results, per_id);
    let in_flight_limit = args.concurrency * args.instances;
    eprintln!(
        "harness: {} results for {} commands in {:.1}s; queues drained: {drained}; re-executions allowed up to {}{}",
        results.len(),
        args.commands,
        started.elapsed().as_secs_f64(),
        args.disruptions * in_flight_limit,
        if redis.is_some() {
            format!("; Redis evicted {evicted} other keys")
        } else {
            String::new()
        }
    );
    cleanup(&args.amqp, &names, &instances, Some(&results_queue)).await;
    let figures = format!(
        "lost={} double_effects={} repeats={} reexecuted={} kills={disruptions}",
        counts.lost, counts.double_effects, counts.repeats, counts.reexecuted
    );
    let ok = counts.lost == 0
        && counts.double_effects == 0
        && counts.repeats == 0
        && drained
        && counts.reexecuted <= args.disruptions * in_flight_limit;
    (figures, ok)
}

/// Declares the topology through the worker itself, plus a durable results queue; returns
/// the results queue's name.
async fn setup(args: &Args, config: &Path, names: &chat_delete_worker::contract::Names) -> String {
    let status = Command::new(&args.worker)
        .args(["--config", config.to_str().unwrap(), "topology"])
        .stdout(Stdio::null())
        .status()
        .await
        .expect("run the worker");
    assert!(status.success(), "topology declaration failed");
    let connection = connect(&args.amqp).await;
    let channel = connection.create_channel().await.unwrap();
    let results_queue = format!("{}.harness.results", names.events_exchange());
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
    let _ = connection.close(200, "declared".into()).await;
    results_queue
}

/// Publishes the commands `ids` (each for its own chat), confirmed.
async fn publish_commands(
    amqp: &str,
    names: &chat_delete_worker::contract::Names,
    instances: &[String],
    ids: std::ops::Range<usize>,
    correlation: &str,
) {
    let connection = connect(amqp).await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // A publish the broker nacks (a queue without its leader while a node restarts) never
    // reached the worker: it is sent again, as a publisher must, and not counted as lost.
    let mut pending: Vec<usize> = ids.collect();
    for attempt in 0.. {
        let mut confirms = Vec::with_capacity(pending.len());
        for &i in &pending {
            let mut headers = FieldTable::default();
            headers.insert(
                ShortString::from("token"),
                AMQPValue::LongString(TOKEN.into()),
            );
            let props = BasicProperties::default()
                .with_message_id(format!("h-{i}").into())
                .with_correlation_id(correlation.into())
                .with_delivery_mode(2)
                .with_headers(headers);
            let body = format!(r#"{{"number": "{}"}}"#, chat_of(i));
            let confirm = channel
                .basic_publish(
                    names.commands_exchange().into(),
                    instances[i % instances.len()].as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body.as_bytes(),
                    props,
                )
                .await
                .unwrap();
            confirms.push((i, confirm));
        }
        let mut refused = vec![];
        for (i, confirm) in confirms {
            match confirm.await {
                Ok(Confirmation::Ack(None)) => {}
                _ => refused.push(i),
            }
        }
        if refused.is_empty() {
            break;
        }
        assert!(attempt < 20, "the broker kept refusing {refused:?}");
        eprintln!(
            "harness: {} publishes refused by the broker; sending them again",
            refused.len()
        );
        sleep(Duration::from_millis(500)).await;
        pending = refused;
    }
    let _ = connection.close(200, "published".into()).await;
}

/// Publishes the commands `0..args.commands` in the background, `batch` at a time, each
/// batch after a `pause()`.
fn publish_in_batches(
    args: &Args,
    names: &chat_delete_worker::contract::Names,
    instances: &[String],
    batch: usize,
    correlation: &'static str,
    pause: impl Fn() -> Duration + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let (amqp, names, instances, n) = (
        args.amqp.clone(),
        names.clone(),
        instances.to_vec(),
        args.commands,
    );
    tokio::spawn(async move {
        for start in (0..n).step_by(batch) {
            sleep(pause()).await;
            let ids = start..(start + batch).min(n);
            publish_commands(&amqp, &names, &instances, ids, correlation).await;
        }
    })
}

struct Counts {
    lost: usize,
    double_effects: usize,
    /// Chats deleted by more than one distinct mutation (a later one deletes more).
    repeats: usize,
    /// Chats whose identical mutation was sent more than once before any answer (a crash
    /// between the delete and its record): the phone's state is the same.
    reexecuted: usize,
}

/// Sets the answers against the effect logs: a delivery without an answer is lost; two
/// different answers for one id, or a delete after the id's first answer, is a double effect;
/// a chat deleted by two different mutations is a repeat; the same mutation sent twice before
/// any answer (a crash between delete and record) is a re-execution.
fn account(
    commands: usize,
    dir: &Path,
    instances: &[String],
    results: &[(String, i64, String)],
    per_id: usize,
) -> Counts {
    let mut by_id: HashMap<String, Vec<(i64, String)>> = HashMap::new();
    for (id, time_us, key) in results {
        by_id
            .entry(id.clone())
            .or_default()
            .push((*time_us, key.clone()));
    }
    // Per chat: (when, the mutation's time) of each delete.
    let mut deletes: HashMap<String, Vec<(i64, String)>> = HashMap::new();
    for instance in instances {
        let text = std::fs::read_to_string(dir.join(format!("effects-{instance}.log")))
            .unwrap_or_default();
        for line in text.lines() {
            let mut fields = line.split(' ');
            let (time, chat) = (fields.next().expect("time"), fields.next().expect("chat"));
            let mutation = fields.next().unwrap_or_default().to_owned();
            deletes
                .entry(chat.to_owned())
                .or_default()
                .push((time.parse().expect("time"), mutation));
        }
    }
    let mut counts = Counts {
        lost: 0,
        double_effects: 0,
        repeats: 0,
        reexecuted: 0,
    };
    for i in 0..commands {
        let id = format!("h-{i}");
        let answers = by_id.get(&id).map(Vec::as_slice).unwrap_or_default();
        let effects = deletes.get(&chat_of(i)).cloned().unwrap_or_default();
        let mutations: HashSet<&String> = effects.iter().map(|(_, m)| m).collect();
        if mutations.len() > 1 {
            counts.repeats += 1;
            eprintln!("harness: repeat on {id}: deleted as of {mutations:?}");
        }
        if answers.len() < per_id {
            counts.lost += 1;
            if answers.is_empty() {
                continue;
            }
        }
        let distinct: HashSet<&String> = answers.iter().map(|(_, k)| k).collect();
        // Event times have millisecond precision (effect times microsecond): a delete counts as
        // late from the millisecond after the answer's.
        let first_result = answers.iter().map(|(t, _)| *t).min().unwrap();
        let late = effects
            .iter()
            .filter(|(t, _)| *t >= first_result + 1_000)
            .count();
        if distinct.len() > 1 || late > 0 {
            counts.double_effects += 1;
            eprintln!(
                "harness: double effect on {id}: results {distinct:?}, {late} delete(s) after the first result"
            );
        } else if effects.len() > 1 {
            counts.reexecuted += 1;
        }
    }
    counts
}

/// The `store-faults` Redis: a private server with an append-only file (a restart keeps its
/// data), at a small memory limit with `volatile-lru`.
struct Redis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    async fn start(dir: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = dir.join("redis");
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Self {
            port,
            dir,
            child: None,
        };
        redis.start_server().await;
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn start_server(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--maxmemory", "32mb", "--maxmemory-policy", "volatile-lru"])
            .args(["--slowlog-log-slower-than", "100000"])
            .args(["--latency-monitor-threshold", "100"])
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while redis_connection(&self.url()).await.is_none() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// A clean stop: the append-only file holds every write.
    async fn stop(&mut self) {
        if let Some(mut connection) = redis_connection(&self.url()).await {
            let _: Result<(), _> = redis::cmd("SHUTDOWN").query_async(&mut connection).await;
        }
        if let Some(mut child) = self.child.take() {
            let _ = timeout(Duration::from_secs(30), child.wait()).await;
        }
    }

    /// What Redis saw of its own stalls (events over 100 ms), for a run that had some.
    async fn stalls(&self) -> String {
        let Some(mut connection) = redis_connection(&self.url()).await else {
            return "unreachable".into();
        };
        let latest: redis::Value = redis::cmd("LATENCY")
            .arg("LATEST")
            .query_async(&mut connection)
            .await
            .unwrap_or(redis::Value::Nil);
        format!("{latest:?}")
    }

    async fn evicted_keys(&self) -> u64 {
        let Some(mut connection) = redis_connection(&self.url()).await else {
            return 0;
        };
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut connection)
            .await
            .unwrap_or_default();
        info.lines()
            .find_map(|l| l.strip_prefix("evicted_keys:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

async fn redis_connection(url: &str) -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url).ok()?;
    timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()
}

/// Keeps writing keys with a TTL, so Redis stays at its memory limit and evicts.
async fn keep_memory_pressed(url: String) {
    let filler = "x".repeat(16 * 1024);
    let mut n = 0u64;
    loop {
        match redis_connection(&url).await {
            Some(mut connection) => loop {
                let set: Result<(), _> = connection
                    .set_ex(format!("harness-filler:{n}"), &filler, 3600)
                    .await;
                n += 1;
                if set.is_err() {
                    break;
                }
                if n.is_multiple_of(64) {
                    sleep(Duration::from_millis(10)).await;
                }
            },
            None => sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Writes a worker config into `dir` (its effect logs and simulated world there too) and
/// returns its path. `redis`: the Redis store's URL (the embedded store without one). Deletes
/// run detached from their command, as the real session's actor sends them, so a command
/// dropped mid-delete shows as a repeat.
fn write_config(
    dir: &Path,
    ns: &str,
    args: &Args,
    hash: &str,
    redis: Option<&str>,
    instances: usize,
) -> PathBuf {
    std::fs::create_dir_all(dir).expect("config folder");
    let mut toml = format!(
        r#"[worker]
concurrency_per_instance = {concurrency}
shutdown_grace_ms = 2000
[broker]
url = "{amqp}"
namespace = "{ns}"
prefetch = {concurrency}
{cluster}
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
        cluster = args.cluster.as_ref().map_or(String::new(), |c| format!(
            "nodes = {:?}\nmanagement_url = \"{}\"\n",
            c.nodes, c.management_url
        )),
    );
    if let Some(cluster) = &args.cluster {
        toml.push_str(&format!(
            "[sessions]\nstore = \"postgres\"\npostgres_url = \"{}\"\n",
            cluster.postgres_url
        ));
    }
    toml.push_str("[idempotency]\n");
    if args.mode == Mode::Slow {
        toml.push_str(&format!("lease_secs = {SLOW_LEASE_SECS}\n"));
    }
    if let Some(url) = redis {
        toml.push_str(&format!(
            "backend = \"redis\"\nredis_url = \"{url}\"\noutage_wait_ms = 1000\n"
        ));
    }
    let mut world = String::new();
    if args.mode == Mode::Scale {
        toml.push_str(&scale::config_toml(ns));
        world = format!(", world_dir = \"{}\"", dir.join("world").display());
    }
    for i in 0..instances {
        toml.push_str(&format!(
            "[instances.inst{i}]\nkind = \"simulated\"\ntoken_sha256 = \"{hash}\"\nsimulated = {{ latency_ms = {latency}, detached_effects = true, effects_log = \"{}\"{world} }}\n",
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
    run_quietly("rabbitmqctl".as_ref(), args).await;
}

/// Runs a command to completion, output discarded; it must succeed.
async fn run_quietly(program: &Path, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    assert!(status.success(), "{} {args:?} failed", program.display());
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

/// Reads results until every id has `per_id` (or 5 minutes pass): (id, event time in µs,
/// status+body).
async fn collect_results(
    url: &str,
    queue: &str,
    expected: usize,
    per_id: usize,
) -> Vec<(String, i64, String)> {
    let mut results = vec![];
    let mut answers: HashMap<String, usize> = HashMap::new();
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
            let (id, time, answer) = read_result(&next);
            results.push((id.clone(), time, answer));
            let count = answers.entry(id.clone()).or_default();
            *count += 1;
            if *count >= per_id {
                answered.insert(id);
            }
            let _ = next.ack(BasicAckOptions::default()).await;
        }
        let _ = connection.close(200, "done".into()).await;
    }
    results
}

/// A result event's id, its CloudEvents time (µs) and its status with its body.
fn read_result(delivery: &lapin::message::Delivery) -> (String, i64, String) {
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let id = delivery
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
    let answer = format!("{status} {}", String::from_utf8_lossy(&delivery.data));
    (id, time, answer)
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
        let mut waiting = vec![];
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
            if q.message_count() > 0 {
                waiting.push(format!(
                    "{instance}: {} ready, {} consumers",
                    q.message_count(),
                    q.consumer_count()
                ));
            }
        }
        let _ = connection.close(200, "checked".into()).await;
        if waiting.is_empty() {
            return true;
        }
        if Instant::now() > deadline {
            // Which queues nobody serves tells a worker's fault from the broker's.
            eprintln!("harness: commands still queued: {}", waiting.join("; "));
            return false;
        }
        sleep(Duration::from_millis(200)).await;
    }
}

async fn cleanup(
    url: &str,
    names: &chat_delete_worker::contract::Names,
    instances: &[String],
    results: Option<&str>,
) {
    let connection = connect(url).await;
    let channel = connection.create_channel().await.unwrap();
    let mut queues = vec![
        names.unrouted_queue(),
        names.parked_queue(),
        names.dead_queue(),
    ];
    queues.extend(results.map(str::to_owned));
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
        names.dead_exchange(),
    ];
    exchanges.extend([200, 1000].iter().map(|d| names.retry_exchange(*d)));
    for e in exchanges {
        let _ = channel
            .exchange_delete(e.into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "cleaned".into()).await;
}
