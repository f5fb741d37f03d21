//! The worker's exchanges and queues, and their idempotent declaration.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::config::{BrokerConfig, QueueType};
use crate::contract::Names;

/// The distinct delays of the configured broker retries: one retry queue each. A command
/// waiting for another try sits in its tier's queue until the queue's TTL dead-letters it back
/// to the commands exchange.
pub fn retry_tiers(broker_delays_ms: &[u64]) -> Vec<u64> {
    let mut tiers = broker_delays_ms.to_vec();
    tiers.sort_unstable();
    tiers.dedup();
    tiers
}

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

/// Arguments shared by the worker's durable queues.
fn queue_args(cfg: &BrokerConfig, extra: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut entries = match cfg.queue_type {
        QueueType::Quorum => vec![("x-queue-type", text("quorum"))],
        QueueType::Classic => vec![("x-queue-type", text("classic"))],
    };
    entries.extend(extra);
    table(entries)
}

/// Declares everything the hosted instances need. Declaring again with the same arguments is a
/// no-op, so every worker does it at start.
pub async fn declare(
    connection: &lapin::Connection,
    cfg: &BrokerConfig,
    names: &Names,
    instances: &[&str],
    retry_tiers_ms: &[u64],
) -> Result<(), lapin::Error> {
    let channel = connection.create_channel().await?;
    declare_shared(&channel, cfg, names, retry_tiers_ms).await?;
    let _ = channel.close(200, "declared".into()).await;
    declare_instance_queues(connection, cfg, names, instances).await
}

/// The exchanges and queues every worker of a namespace shares. Long, but a flat list of
/// declarations in dependency order reads better than helpers that hide which is which.
async fn declare_shared(
    channel: &Channel,
    cfg: &BrokerConfig,
    names: &Names,
    retry_tiers_ms: &[u64],
) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let queue_durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };

    channel
        .exchange_declare(
            names.unrouted_exchange().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            names.commands_exchange().into(),
            ExchangeKind::Direct,
            durable,
            table(vec![(
                "alternate-exchange",
                text(&names.unrouted_exchange()),
            )]),
        )
        .await?;
    channel
        .exchange_declare(
            names.events_exchange().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;

    channel
        .queue_declare(
            names.parked_queue().into(),
            queue_durable,
            queue_args(cfg, vec![]),
        )
        .await?;
    channel
        .queue_declare(
            names.unrouted_queue().into(),
            queue_durable,
            queue_args(cfg, dead_letter_args(cfg, names)),
        )
        .await?;
    channel
        .queue_bind(
            names.unrouted_queue().into(),
            names.unrouted_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    for &delay in retry_tiers_ms {
        channel
            .exchange_declare(
                names.retry_exchange(delay).into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        // No consumer: messages wait out the TTL and dead-letter back with their own routing key.
        let args = queue_args(
            cfg,
            vec![
                ("x-message-ttl", AMQPValue::LongLongInt(delay as i64)),
                ("x-dead-letter-exchange", text(&names.commands_exchange())),
            ],
        );
        channel
            .queue_declare(names.retry_queue(delay).into(), queue_durable, args)
            .await?;
        channel
            .queue_bind(
                names.retry_queue(delay).into(),
                names.retry_exchange(delay).into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }

    Ok(())
}

/// Declares and binds the instance queues, spread over a few channels at once (a worker with
/// a thousand instances would otherwise wait a round trip per step, one after another).
pub async fn declare_instance_queues(
    connection: &lapin::Connection,
    cfg: &BrokerConfig,
    names: &Names,
    instances: &[&str],
) -> Result<(), lapin::Error> {
    const CHANNELS: usize = 8;
    let chunk = instances.len().div_ceil(CHANNELS).max(1);
    let declares = instances.chunks(chunk).map(|part| async move {
        let channel = connection.create_channel().await?;
        for instance in part {
            let mut extra = vec![("x-single-active-consumer", AMQPValue::Boolean(true))];
            extra.extend(dead_letter_args(cfg, names));
            let durable = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            channel
                .queue_declare(
                    names.instance_queue(instance).into(),
                    durable,
                    queue_args(cfg, extra),
                )
                .await?;
            channel
                .queue_bind(
                    names.instance_queue(instance).into(),
                    names.commands_exchange().into(),
                    (*instance).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        let _ = channel.close(200, "declared".into()).await;
        Ok::<(), lapin::Error>(())
    });
    futures_util::future::try_join_all(declares).await?;
    Ok(())
}

/// A message rejected without requeue, or delivered more than the limit (a crash loop), goes to
/// the parking queue instead of being dropped.
fn dead_letter_args<'a>(cfg: &BrokerConfig, names: &Names) -> Vec<(&'a str, AMQPValue)> {
    let mut args = vec![
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text(&names.parked_queue())),
    ];
    if cfg.queue_type == QueueType::Quorum {
        args.push((
            "x-delivery-limit",
            AMQPValue::LongLongInt(cfg.delivery_limit as i64),
        ));
    }
    args
}
