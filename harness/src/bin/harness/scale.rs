//! `--mode scale`: several workers share the instances through Redis leases while commands keep
//! coming. Rounds of: SIGKILL a worker and restart it, SIGSTOP one past its lease and SIGCONT
//! it, SIGTERM one and restart it; then a fourth worker joins and leaves. The harness watches
//! the lease keys in Redis (every 100 ms) to time each failover (from the signal until another
//! worker holds the instance) and the balance at rest; the simulated WhatsApp world counts
//! overlaps (a replaced client that acted after its fence check), refused deletes (under way
//! when their client was replaced, or the owner's after a stale connect) and stale connects.
//! `HARNESS_KEEP=1` keeps the working folder (configs, effect logs, the world, each worker's
//! log `w<n>.log`); `HARNESS_WORKER_LOG` sets the workers' `RUST_LOG` (default `warn`).

use std::collections::{BTreeMap, HashMap, HashSet};
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
        let config = self.config.to_owned();
        self.spawn_with(&config)
    }

    /// A worker started with `config` (another instance list).
    fn spawn_with(&mut self, config: &Path) -> String {
        let name = format!("w{}", self.spawned);
        self.spawned += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .expect("log file");
        let child = tokio::process::Command::new(self.bin)
            .args(["--config", config.to_str().unwrap(), "run"])
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
    /// Reconnects by itself: the run takes its Redis down and back.
    redis: redis::aio::ConnectionManager,
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

    /// Waits (up to a minute) until every instance is held by a live worker, the split is even
    /// and no lease has changed hands for two seconds (a join or a leave moves instances in
    /// steps: the next disruption must not land in the middle of them); answers the spread
    /// (max - min) then, or of the last look.
    async fn settle(&mut self, live: &[String]) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut still = None;
        let mut last = vec![];
        loop {
            let holders = self.holders().await;
            if holders != last {
                still = Some(Instant::now());
                last = holders;
            }
            let spread = self.counts(live).await.map(|c| spread(&c));
            let steady = still.is_some_and(|at| at.elapsed() >= Duration::from_secs(2));
            match spread {
                Some(s) if s <= 1 && steady => return s,
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

/// How long a frozen worker stays frozen: longer than the broker's heartbeat detection, and
/// than the lease, so that answers resuming can only come from the next owner.
fn freeze(quick: bool) -> Duration {
    Duration::from_secs(if quick { 30 } else { 60 })
}

/// The ownership lease the workers run with (the default).
const LEASE: Duration = Duration::from_secs(10);

pub async fn run(args: &Args, rounds: usize, ns: String) -> (String, bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    eprintln!("harness: working in {}", dir.path().display());
    let quick = rounds <= 1;
    let hash = hex::encode(chat_delete_worker::config::TokenHash::of(TOKEN.as_bytes()).0);
    // A Redis of the run's own (append-only, fsync always), so that it can be taken down.
    let mut redis = Redis::start(dir.path()).await;
    let redis_url = redis.url();
    let config = write_config(
        dir.path(),
        &ns,
        args,
        &hash,
        Some(&redis_url),
        args.instances,
    );
    // A worker of a rolling deploy that adds an instance: its list differs from the others'.
    let wider = write_config(
        &dir.path().join("wider"),
        &ns,
        args,
        &hash,
        Some(&redis_url),
        args.instances + 1,
    );
    let parsed = chat_delete_worker::config::Config::load(Some(&config), Vec::new())
        .expect("harness config");
    let names = chat_delete_worker::contract::Names::new(&ns);
    let instances: Vec<String> = (0..args.instances).map(|i| format!("inst{i}")).collect();
    let results_queue = setup(args, &config, &names).await;
    let mut leases = Leases {
        redis: redis::aio::ConnectionManager::new(redis::Client::open(redis_url.as_str()).unwrap())
            .await
            .expect("Redis for the scale harness"),
        prefix: parsed.ownership_prefix(),
        instances: instances.clone(),
    };
    // Another deployment (its own namespace, the same instance names) sharing the Redis, and
    // with --cluster the session database: it must not disturb this one.
    let other_ns = format!("{ns}x");
    let other_names = chat_delete_worker::contract::Names::new(&other_ns);
    let neighbour_config = write_config(
        &dir.path().join("neighbour"),
        &other_ns,
        args,
        &hash,
        Some(&redis_url),
        args.instances,
    );

    let answers = Answers::collect(args.amqp.clone(), results_queue.clone());
    let publishing = Publishing::start(args, &names, &instances);

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
    let mut neighbour = Workers {
        bin: &args.worker,
        config: &neighbour_config,
        dir: &dir.path().join("neighbour"),
        running: BTreeMap::new(),
        spawned: 0,
    };
    neighbour.spawn();
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
    let mut disruptions = vec![];
    let mut node_restarts = 0;
    for _ in 0..rounds {
        // SIGKILL: no hand-over; the others take over once the leases end.
        publishing.caught_up(&answers).await;
        disruptions.push(Instant::now());
        let (_, times) = take_down(&mut workers, &mut leases, "KILL", &log).await;
        failovers.extend(times);
        workers.spawn();
        leases.settle(&live(&workers)).await;

        // SIGSTOP for longer than the lease and the broker's heartbeat: the broker must let
        // the next owner have the queues (and what the frozen one held) long before it wakes.
        publishing.caught_up(&answers).await;
        disruptions.push(Instant::now());
        let frozen_at = Instant::now();
        let (victim, times) = take_down(&mut workers, &mut leases, "STOP", &log).await;
        failovers.extend(times);
        sleep(freeze(quick).saturating_sub(frozen_at.elapsed())).await;
        workers.signal(&victim, "-CONT");
        leases.settle(&live(&workers)).await;
        log(format!(
            "SIGCONT {victim} after {:.1}s: settled",
            frozen_at.elapsed().as_secs_f64()
        ));

        // SIGTERM: a graceful hand-over, then a restart, with a different instance list.
        publishing.caught_up(&answers).await;
        disruptions.push(Instant::now());
        let victim = workers.pick();
        let at = Instant::now();
        workers.signal(&victim, "-TERM");
        workers.wait_exit(&victim).await;
        log(format!(
            "SIGTERM {victim}: exited after {:.1}s",
            at.elapsed().as_secs_f64()
        ));
        let wide = workers.spawn_with(&wider);
        leases.settle(&live(&workers)).await;
        log(format!("{wide} knows one instance more: settled"));

        // Redis down for longer than the lease: every lease ends unrenewed; nothing is done
        // twice when it is back, with its data.
        publishing.caught_up(&answers).await;
        disruptions.push(Instant::now());
        redis.stop().await;
        let down = LEASE + Duration::from_secs(1);
        sleep(down).await;
        redis.start_server().await;
        log(format!("Redis back after {:.1}s", down.as_secs_f64()));
        leases.settle(&live(&workers)).await;

        // A broker node stops (the leader of some instance queues) and comes back. The
        // harness publishes and collects through node 1, so the nodes taken down are 2 and 3.
        if let Some(cluster) = &args.cluster {
            publishing.caught_up(&answers).await;
            disruptions.push(Instant::now());
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
    publishing.caught_up(&answers).await;
    disruptions.push(Instant::now());
    let fourth = workers.spawn();
    let spread4 = leases.settle(&live(&workers)).await;
    log(format!("{fourth} joined: 4 workers, spread {spread4}"));
    workers.signal(&fourth, "-TERM");
    workers.wait_exit(&fourth).await;
    log(format!("{fourth} left"));
    let kills = disruptions.len() + 1;

    let published = publishing.finish().await;
    let commands = published.len();
    let results = answers.wait_for(commands, Duration::from_secs(300)).await;
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
    eprintln!(
        "harness: Redis's own stalls over 100 ms: {}",
        redis.stalls().await
    );
    let ended = Instant::now();
    for name in live(&workers) {
        workers.signal(&name, "-TERM");
        workers.wait_exit(&name).await;
    }
    for name in live(&neighbour) {
        neighbour.signal(&name, "-TERM");
        neighbour.wait_exit(&name).await;
    }

    let answered: Vec<(String, i64, String)> = results
        .iter()
        .map(|a| (a.id.clone(), a.time_us, a.answer.clone()))
        .collect();
    let counts = account(commands, dir.path(), &instances, &answered, 1);
    if counts.lost > 0 {
        // Which commands, on which instances, and what the broker still holds, to trace them.
        let answered: HashSet<&str> = results.iter().map(|a| a.id.as_str()).collect();
        let lost: Vec<String> = (0..commands)
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
        .filter(|a| !a.answer.starts_with("200 "))
        .count();
    let logged = |name: &str| {
        std::fs::read_to_string(dir.path().join("world").join(name))
            .unwrap_or_default()
            .lines()
            .count()
    };
    // A refused delete was under way when its client was replaced (see the simulated world).
    let (overlaps, refused) = (logged("overlaps.log"), logged("refused.log"));
    // A connect that landed after its lease ended, undone at once (see docs/scaling-out.md).
    let stale_connects = logged("stale-connects.log");
    failovers.sort_by(f64::total_cmp);
    let p99 = percentile(&failovers, 0.99);
    let by_window = answer_stalls(&published, &results, &instances, &disruptions, ended);
    let worst: Vec<String> = (0..=disruptions.len())
        .map(|w| {
            let most = by_window
                .iter()
                .filter(|((_, window), _)| *window == w)
                .map(|(_, stall)| *stall)
                .fold(0.0, f64::max);
            format!("{most:.1}")
        })
        .collect();
    eprintln!(
        "harness: worst answer stall before the first disruption and after each: {}",
        worst.join(" ")
    );
    let mut stalls: Vec<f64> = by_window.into_values().collect();
    stalls.sort_by(f64::total_cmp);
    let stall_max = stalls.last().copied().unwrap_or(0.0);
    let stall_p99 = percentile(&stalls, 0.99);
    eprintln!(
        "harness: {} results for {commands} commands in {:.1}s; queues drained: {drained}; answers other than 200: {not_200}; failovers: {} timed, p50 {:.1}s, max {:.1}s; re-sent identical deletes: {}",
        results.len(),
        started.elapsed().as_secs_f64(),
        failovers.len(),
        percentile(&failovers, 0.5),
        failovers.last().copied().unwrap_or(0.0),
        counts.reexecuted,
    );
    if std::env::var_os("HARNESS_KEEP").is_some() {
        let _ = dir.keep();
    }
    let mut wide = instances.clone();
    wide.push(format!("inst{}", instances.len()));
    cleanup(&args.amqp, &names, &wide, Some(&results_queue)).await;
    cleanup(&args.amqp, &other_names, &instances, None).await;
    let cluster = match &args.cluster {
        Some(_) => format!(" node_restarts={node_restarts}"),
        None => String::new(),
    };
    let figures = format!(
        "lost={} double_effects={} overlaps={overlaps} repeats={} failover_p99_s={p99:.1} answer_stall_max_s={stall_max:.1} answer_stall_p99_s={stall_p99:.1} imbalance={imbalance} kills={kills}{cluster} refused={refused} stale_connects={stale_connects}",
        counts.lost, counts.double_effects, counts.repeats,
    );
    let ok = counts.lost == 0
        && counts.double_effects == 0
        && counts.repeats == 0
        && overlaps == 0
        && not_200 == 0
        && drained
        && p99 <= 15.0
        && stall_max <= 15.0
        && imbalance <= 1;
    (figures, ok)
}

/// One result event as the harness received it.
#[derive(Clone)]
struct Answer {
    id: String,
    /// The event's own time (µs), for the effect accounting.
    time_us: i64,
    /// Status and body.
    answer: String,
    received: Instant,
}

/// The results queue, read as the results arrive (a consumer that reconnects when the broker
/// or a node restarts).
struct Answers {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Answer>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Answers {
    fn collect(amqp: String, queue: String) -> Self {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let into = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let connection = connect(&amqp).await;
                let channel = connection.create_channel().await.unwrap();
                channel
                    .basic_qos(1000, BasicQosOptions::default())
                    .await
                    .unwrap();
                let Ok(mut consumer) = channel
                    .basic_consume(
                        queue.as_str().into(),
                        "harness-live".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                else {
                    sleep(Duration::from_millis(500)).await;
                    continue;
                };
                while let Some(Ok(delivery)) = consumer.next().await {
                    let received = Instant::now();
                    let (id, time_us, answer) = read_result(&delivery);
                    into.lock().unwrap().push(Answer {
                        id,
                        time_us,
                        answer,
                        received,
                    });
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                }
                sleep(Duration::from_millis(200)).await;
            }
        });
        Self { seen, task }
    }

    /// Every answer, once each of `commands` ids has one (or `patience` passed).
    async fn wait_for(self, commands: usize, patience: Duration) -> Vec<Answer> {
        let deadline = Instant::now() + patience;
        loop {
            let answered = {
                let seen = self.seen.lock().unwrap();
                seen.iter()
                    .map(|a| a.id.as_str())
                    .collect::<HashSet<_>>()
                    .len()
            };
            if answered >= commands || Instant::now() > deadline {
                break;
            }
            sleep(Duration::from_millis(100)).await;
        }
        self.task.abort();
        self.seen.lock().unwrap().clone()
    }
}

/// Commands published at a steady rate (the kind a bulk clean-up sends) until told to stop.
struct Publishing {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Each command published so far, with when.
    published: std::sync::Arc<std::sync::Mutex<Vec<(usize, Instant)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Publishing {
    /// About 100 commands a second, 25 every 250 ms, at most `args.commands`.
    fn start(
        args: &Args,
        names: &chat_delete_worker::contract::Names,
        instances: &[String],
    ) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let published = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (amqp, names, instances, most) = (
            args.amqp.clone(),
            names.clone(),
            instances.to_vec(),
            args.commands,
        );
        let (stopped, into) = (stop.clone(), published.clone());
        let task = tokio::spawn(async move {
            let mut next = 0;
            while next < most && !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let ids = next..(next + 25).min(most);
                let at = Instant::now();
                // Counted as waiting from the moment they are sent (a slow broker is felt too).
                into.lock().unwrap().extend(ids.clone().map(|i| (i, at)));
                publish_commands(&amqp, &names, &instances, ids.clone(), "scale").await;
                next = ids.end;
                sleep(Duration::from_millis(250).saturating_sub(at.elapsed())).await;
            }
        });
        Self {
            stop,
            published,
            task,
        }
    }

    /// Waits (bounded) until every command published more than a second ago is answered, so
    /// that each disruption starts from a worker that keeps up and is measured on its own.
    async fn caught_up(&self, answers: &Answers) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let due: Vec<String> = {
                let published = self.published.lock().unwrap();
                let old = published
                    .iter()
                    .filter(|(_, at)| at.elapsed() >= Duration::from_secs(1));
                old.map(|(i, _)| format!("h-{i}")).collect()
            };
            let answered: HashSet<String> = {
                let seen = answers.seen.lock().unwrap();
                seen.iter().map(|a| a.id.clone()).collect()
            };
            if due.iter().all(|id| answered.contains(id)) {
                return;
            }
            sleep(Duration::from_millis(100)).await;
        }
        eprintln!("harness: answers did not catch up within a minute");
    }

    /// Stops, and answers each command published with when.
    async fn finish(self) -> Vec<(usize, Instant)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.expect("commands published");
        std::mem::take(&mut *self.published.lock().unwrap())
    }
}

/// For each instance and each stretch between disruptions (keyed (instance, stretch)) in which
/// it had commands waiting, the longest time it went without an answer while some were waiting
/// (seconds): what a publisher waiting for its answers feels, whatever the leases say.
fn answer_stalls(
    published: &[(usize, Instant)],
    answers: &[Answer],
    instances: &[String],
    disruptions: &[Instant],
    end: Instant,
) -> HashMap<(usize, usize), f64> {
    #[derive(Clone, Copy)]
    enum Event {
        Published,
        Answered,
    }
    let mut first_answer: HashMap<&str, Instant> = HashMap::new();
    for answer in answers {
        let at = first_answer
            .entry(answer.id.as_str())
            .or_insert(answer.received);
        *at = (*at).min(answer.received);
    }
    let mut events: Vec<Vec<(Instant, Event)>> = vec![vec![]; instances.len()];
    for (i, at) in published {
        let instance = &mut events[i % instances.len()];
        instance.push((*at, Event::Published));
        if let Some(answered) = first_answer.get(format!("h-{i}").as_str()) {
            instance.push((*answered, Event::Answered));
        }
    }
    let window = |t: Instant| disruptions.partition_point(|d| *d <= t);
    let mut stalls: HashMap<(usize, usize), f64> = HashMap::new();
    let mut worst: Option<(f64, usize, Instant)> = None;
    for (instance, mut timeline) in events.into_iter().enumerate() {
        timeline.sort_by_key(|(t, _)| *t);
        let mut pending = 0usize;
        let mut since = None;
        let mut note = |from: Instant, to: Instant| {
            let length = to.duration_since(from).as_secs_f64();
            let stall = stalls.entry((instance, window(to))).or_insert(0.0);
            *stall = stall.max(length);
            if worst.is_none_or(|(most, _, _)| length > most) {
                worst = Some((length, instance, from));
            }
        };
        for (at, event) in timeline {
            match event {
                Event::Published => {
                    if pending == 0 {
                        since = Some(at);
                    }
                    pending += 1;
                }
                Event::Answered => {
                    if let Some(from) = since {
                        note(from, at);
                    }
                    pending = pending.saturating_sub(1);
                    since = (pending > 0).then_some(at);
                }
            }
        }
        if let Some(from) = since {
            note(from, end);
        }
    }
    if let Some((length, instance, from)) = worst {
        let since = from.duration_since(disruptions.first().copied().unwrap_or(from));
        eprintln!(
            "harness: the worst stall: {} waited {length:.1}s from {:.1}s after the first disruption",
            instances[instance],
            since.as_secs_f64()
        );
    }
    stalls
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

/// The scale harness's part of the worker config: the Redis store's keys and shared
/// ownership (the `[idempotency]` section is open).
pub fn config_toml(ns: &str) -> String {
    format!(
        "key_prefix = \"harness:{ns}:store:\"\n[ownership]\nenabled = true\nkey_prefix = \"harness:{ns}:own:\"\n"
    )
}
