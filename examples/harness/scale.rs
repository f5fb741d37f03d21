//! `--mode scale`: several workers share the instances through Redis leases while commands keep
//! coming. Rounds of: SIGKILL a worker and restart it, SIGSTOP one past its lease and SIGCONT
//! it, SIGTERM one and restart it; then a fourth worker joins and leaves. The harness watches
//! the lease keys in Redis (every 100 ms) to time each failover (from the signal until another
//! worker holds the instance) and the balance at rest; the simulated WhatsApp world counts
//! overlaps (a replaced client that acted after its fence check), refused deletes (under way
//! when their client was replaced, or the owner's after a stale connect) and stale connects.
//! `HARNESS_KEEP=1` keeps the working folder (configs, effect logs, the world, each worker's
//! log `w<n>.log`); `HARNESS_WORKER_LOG` sets the workers' `RUST_LOG` (default `warn`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use rand::seq::IndexedRandom;
use tokio::process::Child;
use tokio::time::{Instant, sleep, timeout};

use super::*;

/// The worker processes, by name (`w0`, `w1`...; a restart takes a new name).
struct Workers<'a> {
    bin: &'a Path,
    config: &'a Path,
    dir: &'a Path,
    running: BTreeMap<String, Child>,
    spawned: usize,
}

impl Workers<'_> {
    fn spawn(&mut self) -> String {
        let name = format!("w{}", self.spawned);
        self.spawned += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .expect("log file");
        let child = tokio::process::Command::new(self.bin)
            .args(["--config", self.config.to_str().unwrap(), "run"])
            .env(
                "RUST_LOG",
                std::env::var("HARNESS_WORKER_LOG").unwrap_or("warn".into()),
            )
            .env("CDW__WORKER__NAME", &name)
            .env("CDW__STORE__PATH", self.dir.join(&name))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start a worker");
        self.running.insert(name.clone(), child);
        name
    }

    fn pick(&self) -> String {
        let names: Vec<&String> = self.running.keys().collect();
        (*names.choose(&mut rand::rng()).unwrap()).clone()
    }

    fn signal(&self, name: &str, signal: &str) {
        let pid = self.running[name].id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {name}");
    }

    async fn wait_exit(&mut self, name: &str) {
        let mut child = self.running.remove(name).expect("running");
        if timeout(Duration::from_secs(60), child.wait())
            .await
            .is_err()
        {
            eprintln!("harness: {name} did not exit within 60 s of SIGTERM; killing it");
            let _ = child.kill().await;
        }
    }
}

/// The lease keys, read from Redis.
struct Leases {
    redis: redis::aio::MultiplexedConnection,
    prefix: String,
    instances: Vec<String>,
}

impl Leases {
    /// Holder worker name per instance (`None`: nobody holds it).
    async fn holders(&mut self) -> Vec<Option<String>> {
        let keys: Vec<String> = self
            .instances
            .iter()
            .map(|i| format!("{}lease:{i}", self.prefix))
            .collect();
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.redis)
            .await
            .unwrap_or_else(|_| vec![None; keys.len()]);
        values.into_iter().map(|v| Some(worker_of(&v?))).collect()
    }

    /// Instances held per live worker; `None` until every instance is held by one of them.
    async fn counts(&mut self, live: &[String]) -> Option<BTreeMap<String, usize>> {
        let mut counts: BTreeMap<String, usize> = live.iter().map(|n| (n.clone(), 0)).collect();
        for holder in self.holders().await {
            *counts.get_mut(&holder?)? += 1;
        }
        Some(counts)
    }

    /// Waits (up to a minute) until every instance is held by a live worker and the split is
    /// even; answers the spread (max - min) then, or of the last look.
    async fn settle(&mut self, live: &[String]) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let spread = self.counts(live).await.map(|c| spread(&c));
            match spread {
                Some(s) if s <= 1 => return s,
                _ if Instant::now() > deadline => return spread.unwrap_or(usize::MAX),
                _ => sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Seconds from `since` until each instance `victim` held is held by someone else.
    async fn failover(&mut self, victim: &str, held: &[usize], since: Instant) -> Vec<f64> {
        let mut times = HashMap::new();
        let deadline = since + Duration::from_secs(120);
        while times.len() < held.len() && Instant::now() < deadline {
            let holders = self.holders().await;
            for i in held {
                if holders[*i].as_deref().is_some_and(|h| h != victim) {
                    times
                        .entry(*i)
                        .or_insert_with(|| since.elapsed().as_secs_f64());
                }
            }
            sleep(Duration::from_millis(100)).await;
        }
        // Never taken over: counted as the whole wait.
        held.iter()
            .map(|i| times.get(i).copied().unwrap_or(120.0))
            .collect()
    }

    async fn held_by(&mut self, worker: &str) -> Vec<usize> {
        self.holders()
            .await
            .iter()
            .enumerate()
            .filter(|(_, h)| h.as_deref() == Some(worker))
            .map(|(i, _)| i)
            .collect()
    }
}

/// `w3-1a2b3c4d|7` → `w3`.
fn worker_of(holder: &str) -> String {
    let member = holder.split('|').next().unwrap_or_default();
    member
        .rsplit_once('-')
        .map_or(member, |(name, _)| name)
        .to_owned()
}

fn spread(counts: &BTreeMap<String, usize>) -> usize {
    let max = counts.values().max().copied().unwrap_or(0);
    let min = counts.values().min().copied().unwrap_or(0);
    max - min
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub async fn run(args: &Args, rounds: usize) -> bool {
    let dir = tempfile::tempdir().expect("temp dir");
    eprintln!("harness: working in {}", dir.path().display());
    let ns = format!("harness{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let hash = hex::encode(chat_delete_worker::config::TokenHash::of(TOKEN.as_bytes()).0);
    let config = write_config(dir.path(), &ns, args, &hash, None);
    let parsed = chat_delete_worker::config::Config::load(Some(&config), Vec::new())
        .expect("harness config");
    let names = chat_delete_worker::contract::Names::new(&ns);
    let instances: Vec<String> = (0..args.instances).map(|i| format!("inst{i}")).collect();
    let results_queue = setup(args, &config, &names).await;
    let mut leases = Leases {
        redis: redis_connection(&parsed.idempotency.redis_url)
            .await
            .expect("Redis for the scale harness"),
        prefix: parsed.ownership_prefix(),
        instances: instances.clone(),
    };

    // Commands keep coming through the whole run, a batch at a time.
    let publisher = publish_in_batches(args, &names, &instances, 100, "scale", || {
        Duration::from_millis(400)
    });

    let started = Instant::now();
    let mut workers = Workers {
        bin: &args.worker,
        config: &config,
        dir: dir.path(),
        running: BTreeMap::new(),
        spawned: 0,
    };
    for _ in 0..3 {
        workers.spawn();
    }
    let live = |w: &Workers| w.running.keys().cloned().collect::<Vec<_>>();
    let log = |what: String| {
        eprintln!("harness: {:6.1}s {what}", started.elapsed().as_secs_f64());
    };
    let spread0 = leases.settle(&live(&workers)).await;
    log(format!(
        "3 workers hold the {} instances (spread {spread0})",
        instances.len()
    ));

    let mut failovers = vec![];
    let mut disruptions = 0;
    let mut node_restarts = 0;
    for _ in 0..rounds {
        // SIGKILL: no hand-over; the others take over once the leases end.
        let (_, times) = take_down(&mut workers, &mut leases, "KILL", &log).await;
        failovers.extend(times);
        disruptions += 1;
        workers.spawn();
        leases.settle(&live(&workers)).await;

        // SIGSTOP past the lease: it wakes up fenced, with nothing.
        let (victim, times) = take_down(&mut workers, &mut leases, "STOP", &log).await;
        failovers.extend(times);
        disruptions += 1;
        workers.signal(&victim, "-CONT");
        leases.settle(&live(&workers)).await;
        log(format!("SIGCONT {victim}: settled"));

        // SIGTERM: a graceful hand-over, then a restart.
        let victim = workers.pick();
        let at = Instant::now();
        workers.signal(&victim, "-TERM");
        workers.wait_exit(&victim).await;
        log(format!(
            "SIGTERM {victim}: exited after {:.1}s",
            at.elapsed().as_secs_f64()
        ));
        disruptions += 1;
        workers.spawn();
        leases.settle(&live(&workers)).await;

        // A broker node stops (the leader of some instance queues) and comes back. The
        // harness publishes and collects through node 1, so the nodes taken down are 2 and 3.
        if let Some(cluster) = &args.cluster {
            let node = 2 + node_restarts % 2;
            let led = leaders_on(cluster, node, &ns);
            let at = Instant::now();
            run_quietly(&cluster.script, &["stop-node", &node.to_string()]).await;
            log(format!("node {node} stopped (it led {led} of the queues)"));
            run_quietly(&cluster.script, &["start-node", &node.to_string()]).await;
            log(format!(
                "node {node} back after {:.1}s",
                at.elapsed().as_secs_f64()
            ));
            node_restarts += 1;
        }
    }
    let fourth = workers.spawn();
    let spread4 = leases.settle(&live(&workers)).await;
    log(format!("{fourth} joined: 4 workers, spread {spread4}"));
    workers.signal(&fourth, "-TERM");
    workers.wait_exit(&fourth).await;
    log(format!("{fourth} left"));
    disruptions += 2;

    publisher.await.expect("commands published");
    let results = collect_results(&args.amqp, &results_queue, args.commands, 1).await;
    let drained = wait_drained(&args.amqp, &names, &instances).await;
    if !drained {
        let holders = leases.holders().await;
        let holders: Vec<String> = instances
            .iter()
            .zip(holders)
            .map(|(i, h)| format!("{i}={}", h.as_deref().unwrap_or("-")))
            .collect();
        eprintln!("harness: lease holders: {}", holders.join(" "));
        if let Some(cluster) = &args.cluster {
            broker_view(cluster, &ns).await;
        }
    }
    let imbalance = leases.settle(&live(&workers)).await;
    for name in live(&workers) {
        workers.signal(&name, "-TERM");
        workers.wait_exit(&name).await;
    }

    let counts = account(args, dir.path(), &instances, &results, 1);
    if counts.lost > 0 {
        // Which commands, on which instances, and what the broker still holds, to trace them.
        let answered: HashSet<&str> = results.iter().map(|(id, _, _)| id.as_str()).collect();
        let lost: Vec<String> = (0..args.commands)
            .filter(|i| !answered.contains(format!("h-{i}").as_str()))
            .map(|i| format!("h-{i}@{}", instances[i % instances.len()]))
            .collect();
        eprintln!("harness: lost: {}", lost.join(" "));
        if let Some(cluster) = &args.cluster {
            broker_view(cluster, &ns).await;
        }
    }
    let not_200 = results
        .iter()
        .filter(|(_, _, answer)| !answer.starts_with("200 "))
        .count();
    let logged = |name: &str| {
        std::fs::read_to_string(dir.path().join("world").join(name))
            .unwrap_or_default()
            .lines()
            .count()
    };
    // A refused delete was under way when its client was replaced (see the simulated world).
    let (overlaps, refused) = (logged("overlaps.log"), logged("refused.log"));
    // A connect that landed after its lease ended, undone at once (see the README).
    let stale_connects = logged("stale-connects.log");
    failovers.sort_by(f64::total_cmp);
    let p99 = percentile(&failovers, 0.99);
    eprintln!(
        "harness: {} results for {} commands in {:.1}s; queues drained: {drained}; answers other than 200: {not_200}; failovers: {} timed, p50 {:.1}s, max {:.1}s",
        results.len(),
        args.commands,
        started.elapsed().as_secs_f64(),
        failovers.len(),
        percentile(&failovers, 0.5),
        failovers.last().copied().unwrap_or(0.0),
    );
    if std::env::var_os("HARNESS_KEEP").is_some() {
        let _ = dir.keep();
    }
    cleanup(&args.amqp, &names, &instances, &results_queue).await;
    delete_keys(&mut leases.redis, &format!("harness:{ns}:*")).await;
    let cluster = match &args.cluster {
        Some(_) => format!(" node_restarts={node_restarts}"),
        None => String::new(),
    };
    println!(
        "lost={} double_effects={} overlaps={overlaps} failover_p99_s={p99:.1} imbalance={imbalance} kills={disruptions}{cluster} refused={refused} stale_connects={stale_connects}",
        counts.lost, counts.double_effects
    );
    counts.lost == 0
        && counts.double_effects == 0
        && overlaps == 0
        && not_200 == 0
        && drained
        && p99 <= 15.0
        && imbalance <= 1
}

/// Sends `signal` (KILL or STOP) to a worker, then times how long the others take to hold
/// each instance it held. Answers the worker and those times.
async fn take_down(
    workers: &mut Workers<'_>,
    leases: &mut Leases,
    signal: &str,
    log: &impl Fn(String),
) -> (String, Vec<f64>) {
    let victim = workers.pick();
    let held = leases.held_by(&victim).await;
    let at = Instant::now();
    workers.signal(&victim, &format!("-{signal}"));
    if signal == "KILL" {
        workers.wait_exit(&victim).await;
    }
    let times = leases.failover(&victim, &held, at).await;
    log(format!(
        "SIG{signal} {victim}: its {} instances taken over in at most {:.1}s",
        times.len(),
        times.iter().copied().fold(0.0, f64::max)
    ));
    (victim, times)
}

/// How many of the namespace's queues have their leader on `node`.
fn leaders_on(cluster: &super::Cluster, node: usize, ns: &str) -> usize {
    let out = std::process::Command::new(&cluster.script)
        .args([
            "ctl",
            &node.to_string(),
            "-q",
            "list_queues",
            "name",
            "leader",
        ])
        .output()
        .expect("scripts/cluster ctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(ns) && l.contains(&format!("cdw{node}@")))
        .count()
}

/// What the broker says of the namespace's queues (with what they hold dead-lettered but not
/// yet moved, which no AMQP count shows) and consumers, for a run that lost commands or left
/// them queued.
async fn broker_view(cluster: &super::Cluster, ns: &str) {
    let url = format!(
        "{}/api/queues/%2F?columns=name,leader,messages,messages_ready,messages_unacknowledged,messages_dlx,consumers",
        cluster.management_url
    );
    let queues = match management_get(&url).await {
        Ok(queues) => queues,
        Err(error) => {
            eprintln!("harness: broker: {error}");
            serde_json::Value::Null
        }
    };
    for q in queues.as_array().into_iter().flatten() {
        if q["name"].as_str().is_some_and(|n| n.starts_with(ns)) {
            eprintln!("harness: broker: {q}");
        }
    }
    let out = std::process::Command::new(&cluster.script)
        .args([
            "ctl",
            "1",
            "-q",
            "list_consumers",
            "queue_name",
            "consumer_tag",
        ])
        .args(["active", "activity_status", "prefetch_count", "channel_pid"])
        .output()
        .expect("scripts/cluster ctl");
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(ns))
    {
        eprintln!("harness: broker: {line}");
    }
}

async fn management_get(url: &str) -> Result<serde_json::Value, String> {
    let response = reqwest::Client::new()
        .get(url)
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let text = response.text().await.map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("{url}: {e}"))
}

async fn delete_keys(redis: &mut redis::aio::MultiplexedConnection, pattern: &str) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(redis)
        .await
        .unwrap_or_default();
    for chunk in keys.chunks(500) {
        let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(redis).await;
    }
}

/// The scale harness's part of the worker config: the Redis store and shared ownership.
pub fn config_toml(ns: &str, world: &Path) -> (String, String) {
    (
        format!(
            "backend = \"redis\"\nkey_prefix = \"harness:{ns}:store:\"\n[ownership]\nenabled = true\nkey_prefix = \"harness:{ns}:own:\"\n"
        ),
        format!(", world_dir = \"{}\"", world.display()),
    )
}
