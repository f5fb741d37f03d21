//! The worker's exchanges and queues, and their idempotent declaration.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

use super::policies::{Policy, escape};
use crate::config::{BrokerConfig, QueueType};
use crate::contract::Names;

/// The distinct delays of the configured broker retries: one retry queue each. A command
/// waiting for another try sits in its tier's queue until the queue's TTL dead-letters it back
/// to the commands exchange.
fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(k), v);
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// The arguments of the worker's quorum queues that say what happens to a message that
/// cannot be delivered: explicit, so RabbitMQ 3.x and 4.x (whose defaults differ) behave the
/// same. Dead-lettering is at-least-once (a message stays until its target confirmed it),
/// which needs publishers to be refused rather than old messages dropped when a queue is full.
fn undeliverable_args(
    cfg: &BrokerConfig,
    target: DeadLetterTarget<'_>,
) -> Vec<(&'static str, AMQPValue)> {
    let mut args = match target {
        DeadLetterTarget::Exchange(exchange) => vec![("x-dead-letter-exchange", text(exchange))],
        DeadLetterTarget::Queue(queue) => vec![
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(queue)),
        ],
    };
    if cfg.queue_type == QueueType::Quorum {
        args.extend([
            (
                "x-delivery-limit",
                AMQPValue::LongLongInt(i64::from(cfg.delivery_limit)),
            ),
            ("x-dead-letter-strategy", text("at-least-once")),
            ("x-overflow", text("reject-publish")),
        ]);
    }
    args
}

/// Where a queue dead-letters to.
#[derive(Clone, Copy)]
enum DeadLetterTarget<'a> {
    Exchange(&'a str),
    Queue(&'a str),
}

/// One queue: its arguments and what it is bound to.
pub struct QueueSpec {
    pub name: String,
    args: FieldTable,
    binding: Option<(String, String)>,
    /// What its messages are (for `topology --upgrade`).
    pub holds: Holds,
    instance: bool,
}

/// What a queue's messages are, so an upgrade knows what to do with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holds {
    /// Commands as publishers sent them (they carry their token).
    Commands,
    /// The worker's own copies (never a token).
    Copies,
}

/// Every exchange and queue of the namespace, in declaration order, and (with
/// `broker.management_url`) the policies that carry what the queues' arguments otherwise would.
pub struct Topology {
    exchanges: Vec<(String, ExchangeKind, FieldTable)>,
    pub queues: Vec<QueueSpec>,
    pub policies: Vec<Policy>,
}

impl QueueSpec {
    /// Whether it is an instance's queue (bound to the commands exchange by the instance's
    /// name), rather than one every worker of the namespace shares.
    fn is_instance(&self) -> bool {
        self.instance
    }

    /// `quorum`, `classic` or `stream`, as declared.
    pub fn queue_type(&self) -> &str {
        match self.args.inner().get("x-queue-type") {
            Some(AMQPValue::LongString(kind)) => std::str::from_utf8(kind.as_bytes()).unwrap_or(""),
            _ => "classic",
        }
    }

    /// The exchange and routing key it is bound with, if any.
    pub fn binding(&self) -> Option<(&str, &str)> {
        self.binding
            .as_ref()
            .map(|(exchange, key)| (exchange.as_str(), key.as_str()))
    }
}

impl Topology {
    pub fn new(
        cfg: &BrokerConfig,
        names: &Names,
        instances: &[&str],
        retry_tiers_ms: &[u64],
    ) -> Self {
        let kind = match cfg.queue_type {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        };
        let queue = |extra: Vec<(&str, AMQPValue)>| {
            let mut entries = vec![("x-queue-type", text(kind))];
            entries.extend(extra);
            table(entries)
        };
        let spec = |name: String, args, binding: Option<(String, &str)>, holds| QueueSpec {
            name,
            args,
            binding: binding.map(|(exchange, key)| (exchange, key.to_owned())),
            holds,
            instance: false,
        };
        let by_policy = cfg.management_url.is_some();
        // With policies, the queues carry only what can never change.
        let arguments = |target: DeadLetterTarget<'_>| match by_policy {
            true => vec![],
            false => undeliverable_args(cfg, target),
        };
        let dead = names.dead_exchange();
        let to_dead = || arguments(DeadLetterTarget::Exchange(&dead));
        let mut exchanges = vec![
            (
                names.unrouted_exchange(),
                ExchangeKind::Fanout,
                FieldTable::default(),
            ),
            (
                names.commands_exchange(),
                ExchangeKind::Direct,
                table(vec![(
                    "alternate-exchange",
                    text(&names.unrouted_exchange()),
                )]),
            ),
            (
                names.events_exchange(),
                ExchangeKind::Topic,
                FieldTable::default(),
            ),
            (
                names.dead_exchange(),
                ExchangeKind::Fanout,
                FieldTable::default(),
            ),
        ];
        let parked = names.parked_queue();
        let mut queues = vec![
            // A stream: listing it is reading, not a delivery, so nothing parked is ever lost
            // to a delivery limit, and it keeps everything (no limit of its own).
            spec(
                parked.clone(),
                table(vec![("x-queue-type", text("stream"))]),
                None,
                Holds::Copies,
            ),
            // Commands that crash-looped: the workers answer and park them. Should that loop
            // too, they go to the parking stream as they are.
            spec(
                names.dead_queue(),
                queue(arguments(DeadLetterTarget::Queue(&parked))),
                Some((names.dead_exchange(), "")),
                Holds::Commands,
            ),
            spec(
                names.unrouted_queue(),
                queue(to_dead()),
                Some((names.unrouted_exchange(), "")),
                Holds::Commands,
            ),
        ];
        for &delay in retry_tiers_ms {
            exchanges.push((
                names.retry_exchange(delay),
                ExchangeKind::Fanout,
                FieldTable::default(),
            ));
            // No consumer: messages wait out the TTL and dead-letter back with their own
            // routing key.
            let mut args = vec![("x-message-ttl", AMQPValue::LongLongInt(delay as i64))];
            let commands = names.commands_exchange();
            args.extend(arguments(DeadLetterTarget::Exchange(&commands)));
            queues.push(spec(
                names.retry_queue(delay),
                queue(args),
                Some((names.retry_exchange(delay), "")),
                Holds::Copies,
            ));
        }
        for instance in instances {
            let mut args = vec![("x-single-active-consumer", AMQPValue::Boolean(true))];
            args.extend(to_dead());
            queues.push(QueueSpec {
                instance: true,
                ..spec(
                    names.instance_queue(instance),
                    queue(args),
                    Some((names.commands_exchange(), instance)),
                    Holds::Commands,
                )
            });
        }
        let policies = match by_policy {
            true => policies(cfg, names),
            false => vec![],
        };
        Self {
            exchanges,
            queues,
            policies,
        }
    }

    /// Declares everything; declaring again with the same arguments is a no-op, so every
    /// worker does it at start. The shared queues first, one after another; then the instance
    /// queues a few channels at once (a worker with a thousand instances would otherwise wait
    /// a round trip per step). If one is refused, nothing else is left half-created: RabbitMQ
    /// (3.10 to 4.2, rabbitmq-server#16652) can lose its at-least-once dead-letter workers
    /// when a quorum queue is deleted while it is still being created.
    pub async fn declare(&self, connection: &lapin::Connection) -> Result<(), lapin::Error> {
        let channel = connection.create_channel().await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for (name, kind, args) in &self.exchanges {
            channel
                .exchange_declare(name.as_str().into(), kind.clone(), durable, args.clone())
                .await?;
        }
        let (instances, shared): (Vec<&QueueSpec>, Vec<&QueueSpec>) =
            self.queues.iter().partition(|q| q.is_instance());
        for queue in shared {
            declare_queue(&channel, queue).await?;
        }
        let _ = channel.close(200, "declared".into()).await;
        const CHANNELS: usize = 8;
        let chunk = instances.len().div_ceil(CHANNELS).max(1);
        let declares = instances.chunks(chunk).map(|part| async move {
            let channel = connection.create_channel().await?;
            for queue in part {
                declare_queue(&channel, queue).await?;
            }
            let _ = channel.close(200, "declared".into()).await;
            Ok::<(), lapin::Error>(())
        });
        futures_util::future::try_join_all(declares).await?;
        Ok(())
    }
}

/// The namespace's policies: every command queue dead-letters to the dead exchange; the dead
/// queue to the parking stream; the retry queues back to the commands exchange. Their patterns
/// are disjoint where it matters: the more specific ones have the higher priority.
fn policies(cfg: &BrokerConfig, names: &Names) -> Vec<Policy> {
    let delete = format!("^{}\\.delete\\.", escape(names.namespace()));
    let commands = names.commands_exchange();
    let dead = names.dead_exchange();
    let parked = names.parked_queue();
    let policy = |suffix: &str, pattern: String, priority, target| {
        let arguments = match target {
            Some(target) => undeliverable_args(cfg, target),
            None => vec![],
        };
        Policy::of_arguments(
            format!("{}.{suffix}", names.namespace()),
            pattern,
            priority,
            &arguments,
        )
    };
    vec![
        policy(
            "commands",
            delete.clone(),
            1,
            Some(DeadLetterTarget::Exchange(&dead)),
        ),
        policy(
            "dead",
            format!("^{}$", escape(&names.dead_queue())),
            2,
            Some(DeadLetterTarget::Queue(&parked)),
        ),
        policy(
            "retry",
            format!("{delete}retry\\."),
            2,
            Some(DeadLetterTarget::Exchange(&commands)),
        ),
        // The parking stream keeps everything: only where its leader goes.
        policy("parked", format!("^{}$", escape(&parked)), 2, None),
    ]
}

/// Declares one queue and its binding.
pub async fn declare_queue(channel: &Channel, queue: &QueueSpec) -> Result<(), lapin::Error> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.name.as_str().into(), durable, queue.args.clone())
        .await?;
    if let Some((exchange, key)) = &queue.binding {
        channel
            .queue_bind(
                queue.name.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}
