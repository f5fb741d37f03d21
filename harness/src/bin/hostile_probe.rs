//! Hostile-publisher probe (run through `scripts/hostile-probe`): what a publisher without
//! special rights can do to a running worker.
//!
//! 1. Oversized bodies: preloads bodies of 20 MiB for a hosted and an unknown instance, starts
//!    the worker, waits for every answer (`400` / `404`) and reads its peak RSS.
//! 2. `reply_to` trap: commands whose `reply_to` is a queue that refuses every publish, or no
//!    queue at all; counts the worker's broker reconnects.
//! 3. Tokens at rest and parking: commands for a disconnected instance go through the retry
//!    queue to the parking stream; every copy that rested in a retry queue (tapped from its
//!    exchange) or in the parking stream is searched for the token. The parking stream is then
//!    listed with `parked list` many times, and what is still listed is counted; `parked replay`
//!    must bring every command back to a `200`.
//!
//! Last line: `reply_to_reconnects=<n> oversized_peak_rss_mib=<n> parked_kept=<k>/<n>
//! clear_tokens_at_rest=<n>`; exits non-zero unless every goal is met.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use chat_delete_worker::bus::read_stream;
use chat_delete_worker::config::TokenHash;
use chat_delete_worker::contract::Names;
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use tokio::process::{Child, Command};
use tokio::time::timeout;

const TOKEN: &str = "probe-secret-token-3f9a";
const BODY: &[u8] = br#"{"number": "5511999999999"}"#;
const OVERSIZED_MIB: usize = 20;
const WAIT: Duration = Duration::from_secs(120);

struct Sizes {
    oversized: usize,
    trapped: usize,
    parked: usize,
    listings: usize,
}

struct Probe {
    bin: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    names: Names,
    connection: Connection,
    channel: Channel,
    events: tokio::sync::Mutex<Consumer>,
    http_port: u16,
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut bin = None;
    let mut amqp = "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned();
    let mut quick = false;
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--worker" => bin = args.next().map(PathBuf::from),
            "--amqp" => amqp = args.next().expect("--amqp needs a URL"),
            "--quick" => quick = true,
            other => panic!("unknown argument {other}"),
        }
    }
    let sizes = if quick {
        Sizes {
            oversized: 10,
            trapped: 20,
            parked: 5,
            listings: 50,
        }
    } else {
        Sizes {
            oversized: 40,
            trapped: 200,
            parked: 20,
            listings: 50,
        }
    };
    let probe = Probe::setup(bin.expect("--worker BIN"), &amqp).await;
    let mut worker = None;
    let outcome = probe.run(&sizes, &mut worker).await;
    if let Some(mut w) = worker {
        let _ = w.kill().await;
    }
    probe.cleanup().await;
    let (reconnects, rss_mib, kept, clear_tokens) = outcome;
    println!(
        "reply_to_reconnects={reconnects} oversized_peak_rss_mib={rss_mib} parked_kept={kept}/{} clear_tokens_at_rest={clear_tokens}",
        sizes.parked
    );
    let met = reconnects == 0 && rss_mib < 256 && kept == sizes.parked && clear_tokens == 0;
    std::process::exit(if met { 0 } else { 1 });
}

impl Probe {
    async fn setup(bin: PathBuf, amqp: &str) -> Self {
        let ns = format!("probe{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let dir = std::env::temp_dir().join(&ns);
        std::fs::create_dir_all(&dir).unwrap();
        let http_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"[broker]
url = "{amqp}"
namespace = "{ns}"
prefetch = 64
[http]
bind = "127.0.0.1"
port = {http_port}
[store]
path = "{dir}"
[retry]
in_process_attempts = 1
broker_delays_ms = [50]
[pacing]
deletes_per_minute = "unlimited"
[instances.alpha]
token_sha256 = "{hash}"
kind = "simulated"
simulated = {{ connected_flag_file = "{dir}/connected" }}
"#,
                dir = dir.display(),
                hash = hex::encode(TokenHash::of(TOKEN.as_bytes()).0),
            ),
        )
        .unwrap();
        std::fs::write(dir.join("connected"), b"").unwrap();
        let names = Names::new(&ns);
        let status = Command::new(&bin)
            .args(["--config", config.to_str().unwrap(), "topology"])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "topology");
        let connection = Connection::connect(amqp, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let events = tap(&channel, &names.events_exchange(), "#").await;
        Self {
            bin,
            config,
            dir,
            names,
            connection,
            channel,
            events: tokio::sync::Mutex::new(events),
            http_port,
        }
    }

    async fn run(&self, sizes: &Sizes, worker: &mut Option<Child>) -> (u64, u64, usize, usize) {
        // 1. Oversized bodies, preloaded so the worker meets them all at once.
        let pad = "x".repeat(OVERSIZED_MIB << 20);
        let oversized = format!(r#"{{"number": "5511999999999", "pad": "{pad}"}}"#);
        drop(pad);
        for i in 0..sizes.oversized {
            self.publish("alpha", &format!("big-{i}"), oversized.as_bytes(), None)
                .await;
            self.publish(
                "nobody",
                &format!("unknown-{i}"),
                oversized.as_bytes(),
                None,
            )
            .await;
        }
        drop(oversized);
        let child = worker.insert(self.spawn_worker());
        let answers = self.answers(2 * sizes.oversized).await;
        let expect = |prefix: &str, status: i64| {
            let wrong: Vec<_> = answers
                .iter()
                .filter(|(id, s)| id.starts_with(prefix) && *s != status)
                .collect();
            assert!(wrong.is_empty(), "{prefix}* answered {wrong:?}");
        };
        expect("big-", 400);
        expect("unknown-", 404);
        let rss_mib = peak_rss_kib(child.id().unwrap()) / 1024;
        eprintln!(
            "oversized: {} answers, peak RSS {rss_mib} MiB",
            answers.len()
        );

        // 2. The reply_to trap: a full queue that refuses publishes, and no queue at all.
        let trap = self.trap_queue();
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongInt(0));
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        self.channel
            .queue_declare(trap.as_str().into(), QueueDeclareOptions::default(), args)
            .await
            .unwrap();
        for i in 0..sizes.trapped {
            let target = if i % 2 == 0 {
                trap.as_str()
            } else {
                "probe-nowhere"
            };
            self.publish("alpha", &format!("trap-{i}"), BODY, Some(target))
                .await;
        }
        let answers = self.answers(sizes.trapped).await;
        assert!(answers.iter().all(|(_, s)| *s == 200), "{answers:?}");
        let reconnects = self.metric("chat_delete_broker_reconnects_total").await;
        eprintln!(
            "reply_to trap: {} answered, {} refused copies counted, {reconnects} reconnects",
            answers.len(),
            self.metric("chat_delete_reply_to_failed_total").await
        );

        // 3. Retry and parking: every copy at rest is looked at.
        let mut taps = vec![];
        for delay in [50] {
            taps.push(tap(&self.channel, &self.names.retry_exchange(delay), "").await);
        }
        taps.push(tap(&self.channel, &self.names.dead_exchange(), "").await);
        std::fs::remove_file(self.dir.join("connected")).unwrap();
        for i in 0..sizes.parked {
            self.publish("alpha", &format!("parked-{i}"), BODY, None)
                .await;
        }
        let answers = self.answers(sizes.parked).await;
        assert!(answers.iter().all(|(_, s)| *s == 503), "{answers:?}");
        let mut at_rest = vec![];
        for tap in &mut taps {
            at_rest.extend(drain(tap, Duration::from_millis(500)).await);
        }
        let mut listed = vec![];
        for _ in 0..sizes.listings {
            listed = self.cli(&["parked", "list", "--json"]).await;
        }
        let kept = (0..sizes.parked)
            .filter(|i| {
                let id = format!("\"parked-{i}\"");
                listed.iter().any(|l| l.contains(&id))
            })
            .count();
        at_rest.extend(self.parking_stream().await);
        let clear_tokens = at_rest.iter().filter(|m| m.contains(TOKEN)).count();
        eprintln!(
            "parking: {kept}/{} listed after {} listings; {} copies at rest, {clear_tokens} with a clear token",
            sizes.parked,
            sizes.listings,
            at_rest.len()
        );
        std::fs::write(self.dir.join("connected"), b"").unwrap();
        self.cli(&["parked", "replay", "--all"]).await;
        let replayed = self.answers(sizes.parked).await;
        assert!(
            replayed.iter().all(|(_, s)| *s == 200),
            "replayed commands open with their proof: {replayed:?}"
        );
        (reconnects, rss_mib, kept, clear_tokens)
    }

    /// Named after the namespace's own queues, so cleanup finds it.
    fn trap_queue(&self) -> String {
        format!("{}.probe-trap", self.names.unrouted_queue())
    }

    async fn publish(&self, instance: &str, id: &str, body: &[u8], reply_to: Option<&str>) {
        let mut headers = FieldTable::default();
        headers.insert("token".into(), AMQPValue::LongString(TOKEN.into()));
        let mut props = BasicProperties::default()
            .with_message_id(id.into())
            .with_headers(headers)
            .with_delivery_mode(2);
        if let Some(r) = reply_to {
            props = props.with_reply_to(r.into());
        }
        self.channel
            .basic_publish(
                self.names.commands_exchange().as_str().into(),
                instance.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// The next `n` result events, as (idempotency id, status).
    async fn answers(&self, n: usize) -> Vec<(String, i64)> {
        let mut events = self.events.lock().await;
        let mut out = vec![];
        while out.len() < n {
            let next = timeout(WAIT, events.next()).await;
            let Ok(Some(Ok(d))) = next else {
                panic!("{} of {n} answers came", out.len())
            };
            d.ack(BasicAckOptions::default()).await.unwrap();
            let headers = d.properties.headers().clone().unwrap_or_default();
            let status = match headers.inner().get("status") {
                Some(AMQPValue::ShortInt(s)) => i64::from(*s),
                Some(AMQPValue::LongInt(s)) => i64::from(*s),
                Some(AMQPValue::LongLongInt(s)) => *s,
                other => panic!("status header {other:?}"),
            };
            let id = d.properties.message_id().as_ref().map(|s| s.to_string());
            out.push((id.unwrap_or_default(), status));
        }
        out
    }

    fn spawn_worker(&self) -> Child {
        Command::new(&self.bin)
            .args(["--config", self.config.to_str().unwrap(), "run"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    /// Runs a subcommand of the worker's binary; its stdout lines.
    async fn cli(&self, args: &[&str]) -> Vec<String> {
        let out = Command::new(&self.bin)
            .args(["--config", self.config.to_str().unwrap()])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    async fn metric(&self, name: &str) -> u64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.http_port))
            .await
            .unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// Everything in the parking stream, read from its first entry.
    async fn parking_stream(&self) -> Vec<String> {
        let queue = self.names.parked_queue();
        let (channel, mut consumer) = read_stream(&self.connection, &queue, 500).await.unwrap();
        let out = drain(&mut consumer, Duration::from_secs(2)).await;
        let _ = channel.close(200, "read".into()).await;
        out
    }

    async fn cleanup(&self) {
        let n = &self.names;
        let queues = [
            n.instance_queue("alpha"),
            n.unrouted_queue(),
            n.parked_queue(),
            n.dead_queue(),
            n.retry_queue(50),
            self.trap_queue(),
        ];
        for q in queues {
            let _ = self
                .channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for e in [
            n.commands_exchange(),
            n.unrouted_exchange(),
            n.events_exchange(),
            n.dead_exchange(),
            n.retry_exchange(50),
        ] {
            let _ = self
                .channel
                .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server-named queue bound to `exchange`: a copy of everything published there.
async fn tap(channel: &Channel, exchange: &str, key: &str) -> Consumer {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap()
}

/// Every message until `idle` passes without one: properties and body as text.
async fn drain(consumer: &mut Consumer, idle: Duration) -> Vec<String> {
    let mut out = vec![];
    while let Ok(Some(Ok(d))) = timeout(idle, consumer.next()).await {
        out.push(format!(
            "{:?} {}",
            d.properties,
            String::from_utf8_lossy(&d.data)
        ));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    out
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
