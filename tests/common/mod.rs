//! Shared test harness: a worker per test with its own namespace on the real RabbitMQ, and a
//! listener for its result events.
#![allow(dead_code)]

pub mod media;
pub mod redis;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chat_delete_worker::config::{Config, TokenHash};
use chat_delete_worker::contract::Names;
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::{Notify, oneshot};

pub const WAIT: Duration = Duration::from_secs(20);

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn hash(token: &str) -> String {
    hex::encode(TokenHash::of(token.as_bytes()).0)
}

/// Everything the worker logs in this test binary, for secret checks.
pub fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        use tracing_subscriber::Layer;
        use tracing_subscriber::layer::SubscriberExt;
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()));
        let subscriber = tracing_subscriber::registry()
            .with(layer.with_filter(chat_delete_worker::telemetry::log_filter("trace")));
        let _ = tracing::subscriber::set_global_default(subscriber);
        buffer
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A running worker with its own namespace, and a client connection for the test.
pub struct TestWorker {
    pub ns: String,
    pub names: Names,
    pub dir: tempfile::TempDir,
    pub channel: Channel,
    pub connection: Connection,
    pub events: Results,
    pub http_addr: Option<std::net::SocketAddr>,
    pub retry_tiers: Vec<u64>,
    pub instances: Vec<String>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// A received result event (a `Delivery` without its acker, so it can be kept and cloned).
#[derive(Debug, Clone)]
pub struct Delivery {
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub properties: BasicProperties,
    pub data: Vec<u8>,
}

/// Result events received on a test queue, by `message_id` (or correlation id).
#[derive(Clone, Default)]
pub struct Results {
    inner: Arc<Mutex<Vec<Delivery>>>,
    arrived: Arc<Notify>,
}

/// An exclusive queue of the test's own, consumed into a `Results`; bound with `#` to
/// `bind_to` when given. Returns its name too (for `reply_to`).
pub async fn private_queue(channel: &Channel, bind_to: Option<&str>) -> (String, Results) {
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare("".into(), options, FieldTable::default())
        .await
        .unwrap();
    if let Some(exchange) = bind_to {
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    let results = Results::consume(channel, queue.name().as_str()).await;
    (queue.name().to_string(), results)
}

impl Results {
    /// Consumes `queue` into this collection.
    pub async fn consume(channel: &Channel, queue: &str) -> Self {
        let results = Results::default();
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let sink = results.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                sink.inner.lock().unwrap().push(Delivery {
                    exchange: delivery.exchange,
                    routing_key: delivery.routing_key,
                    properties: delivery.properties,
                    data: delivery.data,
                });
                sink.arrived.notify_waiters();
            }
        });
        results
    }

    pub fn all(&self) -> Vec<Delivery> {
        self.inner.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the collected deliveries.
    pub async fn wait_until(
        &self,
        what: &str,
        pred: impl Fn(&[Delivery]) -> bool,
    ) -> Vec<Delivery> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.arrived.notified();
            {
                let all = self.inner.lock().unwrap();
                if pred(&all) {
                    return all.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "timed out waiting for {what}; got {} deliveries",
                    self.all().len()
                );
            }
        }
    }

    /// The result whose `message_id` is `id`.
    pub async fn by_id(&self, id: &str) -> Delivery {
        let all = self
            .wait_until(&format!("result {id}"), |all| {
                all.iter().any(|d| message_id(d) == Some(id))
            })
            .await;
        all.into_iter().find(|d| message_id(d) == Some(id)).unwrap()
    }

    pub async fn by_correlation(&self, correlation: &str) -> Delivery {
        let all = self
            .wait_until(&format!("result correlated {correlation}"), |all| {
                all.iter().any(|d| correlation_id(d) == Some(correlation))
            })
            .await;
        all.into_iter()
            .find(|d| correlation_id(d) == Some(correlation))
            .unwrap()
    }
}

pub fn message_id(d: &Delivery) -> Option<&str> {
    d.properties.message_id().as_ref().map(|s| s.as_str())
}

pub fn correlation_id(d: &Delivery) -> Option<&str> {
    d.properties.correlation_id().as_ref().map(|s| s.as_str())
}

pub fn header<'a>(d: &'a Delivery, key: &str) -> Option<&'a AMQPValue> {
    d.properties.headers().as_ref()?.inner().get(key)
}

pub fn header_str(d: &Delivery, key: &str) -> Option<String> {
    match header(d, key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

pub fn header_int(d: &Delivery, key: &str) -> Option<i64> {
    match header(d, key)? {
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        _ => None,
    }
}

pub fn status(d: &Delivery) -> i64 {
    header_int(d, "status").expect("status header")
}

pub fn body(d: &Delivery) -> serde_json::Value {
    serde_json::from_slice(&d.data).expect("result body is JSON")
}

/// A command as a publisher would send it.
pub struct Command<'a> {
    pub instance: &'a str,
    pub id: Option<&'a str>,
    pub token: Option<AMQPValue>,
    pub body: &'a [u8],
    pub correlation_id: Option<&'a str>,
    pub reply_to: Option<&'a str>,
    pub extra_headers: Vec<(&'a str, AMQPValue)>,
}

impl<'a> Command<'a> {
    pub fn new(instance: &'a str, id: &'a str, token: &str, body: &'a [u8]) -> Self {
        Self {
            instance,
            id: Some(id),
            token: Some(AMQPValue::LongString(token.into())),
            body,
            correlation_id: None,
            reply_to: None,
            extra_headers: vec![],
        }
    }
}

impl TestWorker {
    /// Starts a worker whose config is `instances_toml` plus a unique namespace and data folder.
    pub async fn start(extra_toml: &str) -> Self {
        Self::start_tuned(extra_toml, |_| {}).await
    }

    /// As [`Self::start`], with settings of the sections `start` writes changed by `tune`.
    pub async fn start_tuned(extra_toml: &str, tune: impl FnOnce(&mut Config)) -> Self {
        let _ = captured_logs();
        let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "[broker]\nurl = \"{}\"\nnamespace = \"{ns}\"\n[http]\nport = 0\nbind = \"127.0.0.1\"\n[store]\npath = \"{}\"\n{}",
            amqp_url(),
            dir.path().display(),
            extra_toml.replace("{dir}", &dir.path().display().to_string()),
        );
        let mut config = Config::from_toml(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
        tune(&mut config);
        Self::start_with(config, ns, dir).await
    }

    pub async fn start_with(config: Config, ns: String, dir: tempfile::TempDir) -> Self {
        let names = Names::new(&ns);
        let retry_tiers = config.retry.tiers();
        let instances: Vec<String> = config.instances.keys().cloned().collect();
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        // The events exchange may not exist yet: declare it the way the worker does.
        channel
            .exchange_declare(
                names.events_exchange().into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let (_, events) = private_queue(&channel, Some(&names.events_exchange())).await;

        let (stop, stopped) = oneshot::channel::<()>();
        let (addr_tx, addr_rx) = oneshot::channel();
        let task = tokio::spawn(chat_delete_worker::run(
            config,
            async move {
                let _ = stopped.await;
            },
            move |started| {
                let _ = addr_tx.send(started.http_addr);
            },
        ));
        let http_addr = addr_rx.await.ok().flatten();
        let worker = Self {
            ns,
            names,
            dir,
            channel,
            connection,
            events,
            http_addr,
            retry_tiers,
            instances,
            stop: Some(stop),
            task: Some(task),
        };
        worker.wait_ready().await;
        worker
    }

    /// Waits until the worker consumes its instance queues (the broker shows its consumers).
    pub async fn wait_ready(&self) {
        let addr = self.http_addr.expect("tests run with the HTTP port on");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(resp) = http_get(addr, "/readyz").await
                && resp.starts_with("HTTP/1.1 200")
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "worker never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn publish(&self, cmd: Command<'_>) {
        let mut headers = FieldTable::default();
        if let Some(token) = cmd.token {
            headers.insert(ShortString::from("token"), token);
        }
        for (k, v) in cmd.extra_headers {
            headers.insert(ShortString::from(k), v);
        }
        let mut props = BasicProperties::default()
            .with_headers(headers)
            .with_delivery_mode(2);
        if let Some(id) = cmd.id {
            props = props.with_message_id(id.into());
        }
        if let Some(c) = cmd.correlation_id {
            props = props.with_correlation_id(c.into());
        }
        if let Some(r) = cmd.reply_to {
            props = props.with_reply_to(r.into());
        }
        self.channel
            .basic_publish(
                self.names.commands_exchange().into(),
                cmd.instance.into(),
                BasicPublishOptions::default(),
                cmd.body,
                props,
            )
            .await
            .unwrap();
    }

    /// Stops the worker (as SIGTERM does) and waits until it has exited, leaving its queues.
    pub async fn halt(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("worker stops in time")
                .unwrap()
                .expect("worker exits cleanly");
        }
    }

    /// Stops the worker and removes everything its namespace declared.
    pub async fn stop(mut self) {
        self.halt().await;
        let ch = &self.channel;
        let n = &self.names;
        let mut queues = vec![n.unrouted_queue(), n.parked_queue(), n.dead_queue()];
        queues.extend(self.retry_tiers.iter().map(|d| n.retry_queue(*d)));
        let mut exchanges = vec![
            n.commands_exchange(),
            n.unrouted_exchange(),
            n.events_exchange(),
            n.dead_exchange(),
        ];
        exchanges.extend(self.retry_tiers.iter().map(|d| n.retry_exchange(*d)));
        let instances: Vec<String> = self.instances.clone();
        for i in instances {
            let _ = ch
                .queue_delete(n.instance_queue(&i).into(), QueueDeleteOptions::default())
                .await;
        }
        for q in queues {
            let _ = ch
                .queue_delete(q.into(), QueueDeleteOptions::default())
                .await;
        }
        for e in exchanges {
            let _ = ch
                .exchange_delete(e.into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}

/// The value of one series in Prometheus text, 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A minimal HTTP/1.1 GET, enough for our own endpoints.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut out = String::new();
    stream.read_to_string(&mut out).await?;
    Ok(out)
}

/// JSON-Schema validators of the published bodies, from `schemas/`.
pub fn schema(name: &str) -> jsonschema::Validator {
    let path = format!("{}/schemas/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    jsonschema::validator_for(&value).unwrap()
}

pub fn assert_matches_schema(d: &Delivery) {
    let value = body(d);
    let name = if value["success"] == serde_json::Value::Bool(true) {
        "result-success.schema.json"
    } else {
        "result-error.schema.json"
    };
    let validator = schema(name);
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{value} does not match {name}: {errors:?}"
    );
}

pub type Headers = HashMap<String, AMQPValue>;

/// Waits until the parking stream lists `id` (it is parked right after its answer goes out).
pub async fn wait_parked(connection: &Connection, names: &Names, id: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let listed = chat_delete_worker::cli::parked::list(connection, names, 1000)
            .await
            .unwrap();
        if listed
            .iter()
            .any(|p| p.idempotency_id.as_deref() == Some(id))
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} was never parked"
        );
    }
}
