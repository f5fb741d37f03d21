//! `cdw-bench`: the Rust side of `scripts/bench`.
//!
//! Subcommands (all take `--url`, default `amqp://guest:guest@127.0.0.1:5672/%2f`):
//! - `declare`  the worker's topology for the ceiling loop (same exchange names, queue type and
//!              queue arguments as the worker's instance queues), plus an optional results sink.
//! - `sink`     only the results sink: a queue bound to `<ns>.events` with `#`.
//! - `preload`  publishes persistent commands with confirms (at most `--window` unconfirmed).
//! - `ceiling`  the bare lapin loop: consume, check, publish a result with a confirm, then ack.
//!              With `--sync-file F`, each command first appends a record to F and waits for its
//!              `fdatasync` (grouped with the others waiting); with `--redis-url U`, each first
//!              reads one record with `HMGET` (in a pipeline with the others waiting). Either
//!              prices one step of the worker alone: what any worker that takes it must pay.
//! - `latency`  publishes at a steady rate and times each result event from publish to arrival.
//! - `cleanup`  deletes every queue and exchange of a namespace.
//!
//! Each measuring subcommand prints one line `RESULT {json}` on stdout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Retry tiers of the worker's topology (topology.rs `RETRY_TIERS_MS`), for cleanup.
const RETRY_LABELS: [&str; 4] = ["5s", "30s", "2m", "10m"];

struct Args(HashMap<String, String>);

impl Args {
    fn parse(raw: &[String]) -> Res<Self> {
        let mut map = HashMap::new();
        let mut it = raw.iter();
        while let Some(k) = it.next() {
            let key = k.strip_prefix("--").ok_or_else(|| format!("unexpected argument {k}"))?;
            let value = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
            map.insert(key.to_owned(), value.clone());
        }
        Ok(Self(map))
    }
    fn str(&self, key: &str, default: &str) -> String {
        self.0.get(key).cloned().unwrap_or_else(|| default.to_owned())
    }
    fn req(&self, key: &str) -> Res<String> {
        self.0.get(key).cloned().ok_or_else(|| format!("--{key} is required").into())
    }
    fn num<T: std::str::FromStr>(&self, key: &str, default: T) -> Res<T> {
        match self.0.get(key) {
            Some(v) => v.parse().map_err(|_| format!("--{key}: not a number: {v}").into()),
            None => Ok(default),
        }
    }
    fn url(&self) -> String {
        self.str("url", "amqp://guest:guest@127.0.0.1:5672/%2f")
    }
    /// `--instances a,b,c` or `--instance-count K [--instance-prefix i]` (i0000, i0001...).
    fn instances(&self) -> Res<Vec<String>> {
        if let Some(list) = self.0.get("instances") {
            return Ok(list.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect());
        }
        let count: usize = self.num("instance-count", 0)?;
        let prefix = self.str("instance-prefix", "i");
        Ok((0..count).map(|i| instance_name(&prefix, i)).collect())
    }
}

fn instance_name(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:04}")
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(k), v);
    }
    t
}

async fn connect(url: &str, name: &str) -> Res<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    // A broker that accepts TCP but never answers the handshake must not hang the bench.
    match tokio::time::timeout(Duration::from_secs(20), Connection::connect(url, props)).await {
        Ok(conn) => Ok(conn?),
        Err(_) => Err(format!("{name}: the broker did not complete the AMQP handshake within 20 s").into()),
    }
}

/// Closes the connection politely, but never waits more than 5 s for the broker's answer.
async fn close(conn: &Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "done".into())).await;
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions { durable: true, ..Default::default() }
}

/// Everything a command carries, built the same way for a given (instance, id).
fn command_body(seq: u64, pad_to: usize) -> Vec<u8> {
    let number = format!("5511{:09}", seq % 1_000_000_000);
    let mut body = format!(r#"{{"number":"{number}","deleteMedia":false,"note":""#);
    // The padding keeps the body at `pad_to` bytes, like a real caller's extra fields.
    let close = "\"}";
    let fill = pad_to.saturating_sub(body.len() + close.len());
    body.extend(std::iter::repeat_n('x', fill));
    body.push_str(close);
    body.into_bytes()
}

fn command_props(id: &str, token: &str, extra: Option<(&str, AMQPValue)>) -> BasicProperties {
    let mut headers = vec![("token", text(token))];
    if let Some(e) = extra {
        headers.push(e);
    }
    BasicProperties::default()
        .with_message_id(id.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(table(headers))
}

fn now_epoch_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// utime + stime of this process, in seconds.
fn self_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat; `after` starts at field 3.
    (ticks(11) + ticks(12)) / 100.0
}

fn self_status_kb(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------------

/// The instance queues and exchanges exactly as the worker declares them (topology.rs), so the
/// ceiling consumes from the same kind of queue: quorum, single active consumer, dead-lettering
/// to the parking queue, delivery limit.
async fn declare(a: &Args) -> Res<()> {
    let ns = a.req("ns")?;
    let queue_type = a.str("queue-type", "quorum");
    let delivery_limit: i64 = a.num("delivery-limit", 20)?;
    let conn = connect(&a.url(), "cdw-bench declare").await?;
    let ch = conn.create_channel().await?;
    let unrouted = format!("{ns}.commands.unrouted");
    ch.exchange_declare(unrouted.as_str().into(), ExchangeKind::Fanout, durable_exchange(), FieldTable::default())
        .await?;
    ch.exchange_declare(
        format!("{ns}.commands").as_str().into(),
        ExchangeKind::Direct,
        durable_exchange(),
        table(vec![("alternate-exchange", text(&unrouted))]),
    )
    .await?;
    ch.exchange_declare(format!("{ns}.events").as_str().into(), ExchangeKind::Topic, durable_exchange(), FieldTable::default())
        .await?;
    for instance in a.instances()? {
        let mut args = vec![
            ("x-queue-type", text(&queue_type)),
            ("x-single-active-consumer", AMQPValue::Boolean(true)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(&format!("{ns}.delete.parked"))),
        ];
        if queue_type == "quorum" {
            args.push(("x-delivery-limit", AMQPValue::LongLongInt(delivery_limit)));
        }
        let queue = format!("{ns}.delete.{instance}");
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            table(args),
        )
        .await?;
        ch.queue_bind(
            queue.as_str().into(),
            format!("{ns}.commands").as_str().into(),
            instance.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    if a.str("sink", "0") == "1" {
        declare_sink(&ch, &ns).await?;
    }
    close(&conn).await;
    Ok(())
}

/// The one queue bound to the events exchange during throughput runs: every result is routed
/// (as with a real listener), but the queue is transient and capped, so the broker neither
/// writes results to disk nor lets them pile up.
async fn declare_sink(ch: &Channel, ns: &str) -> Res<()> {
    let events = format!("{ns}.events");
    ch.exchange_declare(events.as_str().into(), ExchangeKind::Topic, durable_exchange(), FieldTable::default())
        .await?;
    let sink = format!("{ns}.results");
    ch.queue_declare(
        sink.as_str().into(),
        QueueDeclareOptions::default(),
        table(vec![
            ("x-queue-type", text("classic")),
            ("x-max-length", AMQPValue::LongInt(1000)),
        ]),
    )
    .await?;
    ch.queue_bind(sink.as_str().into(), events.as_str().into(), "#".into(), QueueBindOptions::default(), FieldTable::default())
        .await?;
    Ok(())
}

async fn sink(a: &Args) -> Res<()> {
    let ns = a.req("ns")?;
    let conn = connect(&a.url(), "cdw-bench sink").await?;
    let ch = conn.create_channel().await?;
    declare_sink(&ch, &ns).await?;
    close(&conn).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// Publishes `per-instance` commands to each instance, round robin, persistent, with confirms.
/// Ids are `<id-prefix>-<instance>-<j>` and bodies depend only on (instance index, j), so a
/// second preload with the same prefix replays the very same commands.
async fn preload(a: &Args) -> Res<()> {
    let ns = a.req("ns")?;
    let instances = a.instances()?;
    let per_instance: u64 = a.num("per-instance", 0)?;
    let token = a.req("token")?;
    let id_prefix = a.str("id-prefix", "cmd");
    let window: usize = a.num("window", 1000)?;
    let body_size: usize = a.num("body-size", 200)?;
    let conn = connect(&a.url(), "cdw-bench preload").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let exchange = format!("{ns}.commands");
    let sem = Arc::new(Semaphore::new(window));
    let nacked = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut total = 0u64;
    for j in 0..per_instance {
        for (k, instance) in instances.iter().enumerate() {
            let seq = j * instances.len() as u64 + k as u64;
            let id = format!("{id_prefix}-{instance}-{j}");
            let permit = sem.clone().acquire_owned().await?;
            let confirm = ch
                .basic_publish(
                    exchange.as_str().into(),
                    instance.as_str().into(),
                    BasicPublishOptions::default(),
                    &command_body(seq, body_size),
                    command_props(&id, &token, None),
                )
                .await?;
            let nacked = nacked.clone();
            tokio::spawn(async move {
                match confirm.await {
                    Ok(Confirmation::Ack(_)) => {}
                    _ => {
                        nacked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                drop(permit);
            });
            total += 1;
        }
    }
    let _all = tokio::time::timeout(Duration::from_secs(120), sem.acquire_many(window as u32))
        .await
        .map_err(|_| "preload: confirms did not all arrive within 120 s")??;
    let secs = started.elapsed().as_secs_f64();
    let nacked = nacked.load(Ordering::Relaxed);
    close(&conn).await;
    println!(
        "RESULT {}",
        json!({"what": "preload", "n": total, "secs": secs, "rate": total as f64 / secs, "nacked": nacked})
    );
    if nacked > 0 {
        return Err(format!("preload: {nacked} publishes were not confirmed").into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

struct Ceiling {
    before: Before,
    events_exchange: String,
    token_hash: [u8; 32],
    acked: AtomicUsize,
    failed: AtomicUsize,
    target: usize,
    svc_us: Mutex<Vec<u64>>,
    first: OnceLock<Instant>,
    last: Mutex<Option<Instant>>,
    done: Notify,
}

/// What the bare loop does before publishing a result.
enum Before {
    Nothing,
    /// Hands a record to the syncing thread; answered once it is on disk.
    Sync(std::sync::mpsc::Sender<(Vec<u8>, oneshot::Sender<()>)>),
    /// Asks the looking task for one Redis read; answered once the read's reply is in.
    Look(mpsc::UnboundedSender<oneshot::Sender<()>>),
}

impl Before {
    async fn run(&self, record: &[u8]) {
        // The plain ceiling makes no channel.
        let wait = match self {
            Before::Nothing => return,
            Before::Sync(to) => {
                let (done, wait) = oneshot::channel();
                to.send((record.to_vec(), done)).expect("the syncing thread runs");
                wait
            }
            Before::Look(to) => {
                let (done, wait) = oneshot::channel();
                to.send(done).expect("the looking task runs");
                wait
            }
        };
        wait.await.expect("an answer");
    }
}

/// Group commit at its simplest: whatever is waiting when a sync ends goes in the next one.
fn start_syncing(path: &str) -> Res<std::sync::mpsc::Sender<(Vec<u8>, oneshot::Sender<()>)>> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let (to, from) = std::sync::mpsc::channel::<(Vec<u8>, oneshot::Sender<()>)>();
    std::thread::spawn(move || {
        while let Ok(first) = from.recv() {
            let mut group = vec![first];
            group.extend(from.try_iter().take(1023));
            for (record, _) in &group {
                file.write_all(record).expect("append");
            }
            file.sync_data().expect("fdatasync");
            for (_, done) in group {
                let _ = done.send(());
            }
        }
    });
    Ok(to)
}

/// Reads as the worker's Redis store looks for a settled answer: one `HMGET` per command, those
/// waiting sent in one pipeline (up to 256), four pipelines in flight.
async fn start_looking(url: &str, key: String) -> Res<mpsc::UnboundedSender<oneshot::Sender<()>>> {
    let client = redis::Client::open(url)?;
    let connection = client.get_multiplexed_async_connection().await?;
    // A remembered answer of about the worker's size.
    let mut set = connection.clone();
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("fp")
        .arg("f".repeat(64))
        .arg("result")
        .arg("r".repeat(320))
        .arg("expires")
        .arg(u64::MAX / 2)
        .query_async(&mut set)
        .await?;
    let (to, mut from) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
    tokio::spawn(async move {
        let places = Arc::new(Semaphore::new(4));
        while let Some(first) = from.recv().await {
            let place = places.clone().acquire_owned().await.expect("never closed");
            let mut batch = vec![first];
            while batch.len() < 256 {
                match from.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let mut pipe = redis::pipe();
            for _ in &batch {
                pipe.cmd("HMGET").arg(&key).arg("fp").arg("result").arg("expires");
            }
            let mut connection = connection.clone();
            tokio::spawn(async move {
                let read: redis::RedisResult<Vec<Vec<Option<String>>>> = pipe.query_async(&mut connection).await;
                read.expect("HMGET");
                for done in batch {
                    let _ = done.send(());
                }
                drop(place);
            });
        }
    });
    Ok(to)
}

fn valid_number(input: &str) -> Option<String> {
    let digits = input.trim();
    let digits = digits.strip_prefix('+').unwrap_or(digits);
    let digits: String = digits.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
    let ok = (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0');
    ok.then(|| format!("{digits}@s.whatsapp.net"))
}

/// The same per-command work as the worker's happy path, minus the worker's design: read the
/// envelope, check the token's SHA-256, parse and validate the body, build a result event like
/// the worker's (JSON body, CloudEvents headers), publish it mandatory and persistent on a
/// confirm channel, await the confirm, then ack.
async fn ceiling_one(st: &Ceiling, publisher: &Channel, delivery: lapin::message::Delivery) {
    let received = Instant::now();
    st.first.get_or_init(|| received);
    let props = &delivery.properties;
    let id = props.message_id().as_ref().map(|s| s.as_str().to_owned()).unwrap_or_default();
    let token_ok = props
        .headers()
        .as_ref()
        .and_then(|h| match h.inner().get("token") {
            Some(AMQPValue::LongString(s)) => Some(Sha256::digest(s.as_bytes())),
            _ => None,
        })
        .is_some_and(|d| d.as_slice() == st.token_hash);
    let instance = delivery.routing_key.as_str().to_owned();
    let chat = serde_json::from_slice::<serde_json::Value>(&delivery.data)
        .ok()
        .and_then(|v| v.get("number").and_then(|n| n.as_str()).and_then(valid_number));
    let (status, body, event_type) = match (token_ok, &chat) {
        (true, Some(chat)) => (
            200,
            json!({"success": true, "message": "Chat deleted successfully", "chat_jid": chat, "delete_media": false}),
            "chat.deleted",
        ),
        _ => (400, json!({"success": false, "error": {"message": "Invalid request"}}), "chat.delete_failed"),
    };
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let headers = table(vec![
        ("status", AMQPValue::LongInt(status)),
        ("instance", text(&instance)),
        ("idempotency_id", text(&id)),
        ("attempts", AMQPValue::LongInt(1)),
        ("replayed", AMQPValue::Boolean(false)),
        ("cloudEvents_specversion", text("1.0")),
        ("cloudEvents_id", text(&id)),
        ("cloudEvents_source", text(&format!("/instances/{instance}"))),
        ("cloudEvents_type", text(event_type)),
        ("cloudEvents_time", text(&now_epoch_ms().to_string())),
    ]);
    let properties = BasicProperties::default()
        .with_message_id(id.as_str().into())
        .with_correlation_id(id.as_str().into())
        .with_content_type("application/json".into())
        .with_type(event_type.into())
        .with_timestamp((now_epoch_ms() / 1000) as u64)
        .with_app_id("cdw-bench-ceiling".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    let routing_key = format!("{event_type}.{instance}");
    st.before.run(&body).await;
    let published = async {
        let confirm = publisher
            .basic_publish(
                st.events_exchange.as_str().into(),
                routing_key.as_str().into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                &body,
                properties,
            )
            .await?
            .await?;
        Ok::<_, lapin::Error>(matches!(confirm, Confirmation::Ack(_)))
    }
    .await;
    let ok = matches!(published, Ok(true));
    let settled = if ok {
        delivery.ack(BasicAckOptions::default()).await
    } else {
        delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
    };
    if !ok || settled.is_err() {
        st.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let svc = received.elapsed().as_micros() as u64;
    st.svc_us.lock().unwrap().push(svc);
    if st.acked.fetch_add(1, Ordering::AcqRel) + 1 == st.target {
        *st.last.lock().unwrap() = Some(Instant::now());
        st.done.notify_one();
    }
}

/// The bare loop on one queue (`--instance`), or on many (`--instances` / `--instance-count`),
/// each queue on a channel of its own with the same prefetch, as the worker consumes them.
async fn ceiling(a: &Args) -> Res<()> {
    let ns = a.req("ns")?;
    let mut queues = a.instances()?;
    if queues.is_empty() {
        queues.push(a.str("instance", "bench"));
    }
    let prefetch: u16 = a.num("prefetch", 500)?;
    let n: usize = a.num("n", 0)?;
    let token = a.req("token")?;
    let timeout_s: u64 = a.num("timeout-s", 600)?;
    let conn = connect(&a.url(), "cdw-bench ceiling").await?;
    let publisher = conn.create_channel().await?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await?;
    let before = match (a.0.get("sync-file"), a.0.get("redis-url")) {
        (Some(path), _) => Before::Sync(start_syncing(path)?),
        (None, Some(url)) => Before::Look(start_looking(url, format!("{ns}:probe")).await?),
        (None, None) => Before::Nothing,
    };
    let st = Arc::new(Ceiling {
        before,
        events_exchange: format!("{ns}.events"),
        token_hash: Sha256::digest(token.as_bytes()).into(),
        acked: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        target: n,
        svc_us: Mutex::new(Vec::with_capacity(n)),
        first: OnceLock::new(),
        last: Mutex::new(None),
        done: Notify::new(),
    });
    let cpu0 = self_cpu_s();
    let mut readers = vec![];
    for instance in &queues {
        let consumer_ch = conn.create_channel().await?;
        consumer_ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let mut consumer = consumer_ch
            .basic_consume(
                format!("{ns}.delete.{instance}").as_str().into(),
                "cdw-bench-ceiling".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let reader_st = st.clone();
        let publisher = publisher.clone();
        readers.push(tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let st = reader_st.clone();
                let publisher = publisher.clone();
                // One task per delivery, as the worker does.
                tokio::spawn(async move { ceiling_one(&st, &publisher, delivery).await });
            }
        }));
    }
    let finished = tokio::time::timeout(Duration::from_secs(timeout_s), st.done.notified()).await;
    let cpu = self_cpu_s() - cpu0;
    for reader in readers {
        reader.abort();
    }
    if finished.is_err() {
        return Err(format!(
            "ceiling: only {} of {n} acked after {timeout_s} s",
            st.acked.load(Ordering::Relaxed)
        )
        .into());
    }
    let first = *st.first.get().expect("a first delivery");
    let last = st.last.lock().unwrap().expect("a last ack");
    let secs = (last - first).as_secs_f64();
    let mut svc = std::mem::take(&mut *st.svc_us.lock().unwrap());
    svc.sort_unstable();
    println!(
        "RESULT {}",
        json!({
            "what": "ceiling", "n": n, "queues": queues.len(), "prefetch": prefetch, "secs": secs, "rate": n as f64 / secs,
            "svc_p50_ms": percentile(&svc, 50.0) as f64 / 1000.0,
            "svc_p99_ms": percentile(&svc, 99.0) as f64 / 1000.0,
            "svc_max_ms": percentile(&svc, 100.0) as f64 / 1000.0,
            "failed": st.failed.load(Ordering::Relaxed),
            "cpu_s": cpu, "cpu_us_per_cmd": cpu * 1e6 / n as f64,
            "peak_rss_kb": self_status_kb("VmHWM:"),
        })
    );
    close(&conn).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// Publishes `rate` commands/s for `seconds`, each timestamped when handed to the broker, and
/// times every result event (matched by message_id) from that publish to its arrival.
async fn latency(a: &Args) -> Res<()> {
    let ns = a.req("ns")?;
    let instance = a.str("instance", "bench");
    let rate: f64 = a.num("rate", 1000.0)?;
    let seconds: f64 = a.num("seconds", 30.0)?;
    let token = a.req("token")?;
    let id_prefix = a.str("id-prefix", "lat");
    let drain_s: u64 = a.num("drain-timeout-s", 60)?;
    let n = (rate * seconds).round() as usize;
    let conn = connect(&a.url(), "cdw-bench latency").await?;

    // The listener: its own exclusive queue on the events exchange.
    let lch = conn.create_channel().await?;
    let events = format!("{ns}.events");
    lch.exchange_declare(events.as_str().into(), ExchangeKind::Topic, durable_exchange(), FieldTable::default())
        .await?;
    let q = lch
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() }, FieldTable::default())
        .await?;
    lch.queue_bind(q.name().clone(), events.as_str().into(), "#".into(), QueueBindOptions::default(), FieldTable::default())
        .await?;
    let mut listener = lch
        .basic_consume(q.name().clone(), "cdw-bench-latency".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
        .await?;

    let t0 = Instant::now();
    let sent_ns: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(u64::MAX)).collect());
    let lat_us = Arc::new(Mutex::new(Vec::<u64>::with_capacity(n)));
    let received = Arc::new(AtomicUsize::new(0));
    let all_in = Arc::new(Notify::new());
    let prefix = format!("{id_prefix}-");
    {
        let sent_ns = sent_ns.clone();
        let lat_us = lat_us.clone();
        let received = received.clone();
        let all_in = all_in.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = listener.next().await {
                let now = t0.elapsed().as_nanos() as u64;
                let Some(i) = d
                    .properties
                    .message_id()
                    .as_ref()
                    .and_then(|m| m.as_str().strip_prefix(prefix.as_str()))
                    .and_then(|s| s.parse::<usize>().ok())
                else {
                    continue;
                };
                let Some(sent) = sent_ns.get(i).map(|s| s.load(Ordering::Acquire)) else { continue };
                if sent == u64::MAX {
                    continue;
                }
                lat_us.lock().unwrap().push(now.saturating_sub(sent) / 1000);
                if received.fetch_add(1, Ordering::AcqRel) + 1 == n {
                    all_in.notify_one();
                }
            }
        });
    }

    let pch = conn.create_channel().await?;
    pch.confirm_select(ConfirmSelectOptions::default()).await?;
    let exchange = format!("{ns}.commands");
    let sem = Arc::new(Semaphore::new(1000));
    let period = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    for i in 0..n {
        tokio::time::sleep_until(start + period * i as u32).await;
        let permit = sem.clone().acquire_owned().await?;
        let id = format!("{id_prefix}-{i}");
        sent_ns[i].store(t0.elapsed().as_nanos() as u64, Ordering::Release);
        let confirm = pch
            .basic_publish(
                exchange.as_str().into(),
                instance.as_str().into(),
                BasicPublishOptions::default(),
                &command_body(i as u64, 200),
                command_props(&id, &token, None),
            )
            .await?;
        tokio::spawn(async move {
            let _ = confirm.await;
            drop(permit);
        });
    }
    let offered_secs = start.elapsed().as_secs_f64();
    let _ = tokio::time::timeout(Duration::from_secs(drain_s), all_in.notified()).await;
    let got = received.load(Ordering::Acquire);
    let mut lat = std::mem::take(&mut *lat_us.lock().unwrap());
    lat.sort_unstable();
    let ms = |p: f64| percentile(&lat, p) as f64 / 1000.0;
    println!(
        "RESULT {}",
        json!({
            "what": "latency", "n": n, "received": got, "offered_rate": rate,
            "achieved_publish_rate": n as f64 / offered_secs,
            "p50_ms": ms(50.0), "p99_ms": ms(99.0), "p999_ms": ms(99.9), "max_ms": ms(100.0),
        })
    );
    close(&conn).await;
    if got < n {
        return Err(format!("latency: only {got} of {n} results arrived").into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// Deletes the namespace's queues and exchanges (those of the worker's topology, the ceiling's
/// and the sink), on a few channels at once: a thousand quorum queues take a while.
async fn cleanup(a: &Args) -> Res<()> {
    let ns = a.req("ns")?;
    let mut queues: Vec<String> = a.instances()?.iter().map(|i| format!("{ns}.delete.{i}")).collect();
    queues.push(format!("{ns}.delete.unrouted"));
    queues.push(format!("{ns}.delete.parked"));
    queues.push(format!("{ns}.delete.dead"));
    queues.push(format!("{ns}.results"));
    queues.extend(RETRY_LABELS.iter().map(|l| format!("{ns}.delete.retry.{l}")));
    let mut exchanges =
        vec![format!("{ns}.commands"), format!("{ns}.commands.unrouted"), format!("{ns}.events"), format!("{ns}.dead")];
    exchanges.extend(RETRY_LABELS.iter().map(|l| format!("{ns}.retry.{l}")));
    let conn = Arc::new(connect(&a.url(), "cdw-bench cleanup").await?);
    let lanes = 8usize;
    let queues = Arc::new(queues);
    let failed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        let conn = conn.clone();
        let queues = queues.clone();
        let failed = failed.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(mut ch) = conn.create_channel().await else { return };
            for q in queues.iter().skip(lane).step_by(lanes) {
                if ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                    match conn.create_channel().await {
                        Ok(c) => ch = c,
                        Err(_) => return,
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut ch = conn.create_channel().await?;
    for e in exchanges {
        if ch.exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default()).await.is_err() {
            ch = conn.create_channel().await?;
        }
    }
    close(&conn).await;
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        eprintln!("cleanup: {failed} queue deletes failed in {ns}");
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let Some(cmd) = argv.get(1).cloned() else {
        eprintln!("usage: cdw-bench <declare|sink|preload|ceiling|latency|cleanup> [--key value]...");
        std::process::exit(2);
    };
    let result = async {
        let a = Args::parse(&argv[2..])?;
        match cmd.as_str() {
            "declare" => declare(&a).await,
            "sink" => sink(&a).await,
            "preload" => preload(&a).await,
            "ceiling" => ceiling(&a).await,
            "latency" => latency(&a).await,
            "cleanup" => cleanup(&a).await,
            other => Err(format!("unknown subcommand {other}").into()),
        }
    }
    .await;
    if let Err(e) = result {
        eprintln!("cdw-bench {cmd}: {e}");
        std::process::exit(1);
    }
    // Do not wait for lapin's background threads on the way out.
    std::process::exit(0);
}
