//! `topology --upgrade`: brings queues declared by an earlier version (other arguments; a
//! quorum parking queue where a stream is now) to this version's declaration, keeping every
//! message. Each such queue is emptied into a temporary queue, deleted, declared anew and
//! filled again; copies the worker kept (retries, parked commands) lose their clear token on
//! the way. The workers must be stopped: a queue with consumers is left alone.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};

use super::BrokerError;
use super::confirm::{confirm_channel, publish_confirmed};
use super::settle::without_token;
use super::topology::{Holds, QueueSpec, Topology, declare_queue};
use crate::contract::wire::{ORIGINAL_ROUTING_KEY_HEADER, text_header};

/// What an upgrade did.
#[derive(Debug, Default)]
pub struct Upgraded {
    /// Queues declared anew, with the messages moved.
    pub queues: Vec<(String, usize)>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("queue {0} has {1} consumer(s): stop every worker before upgrading")]
    InUse(String, u32),
    #[error("queue {0} still holds {1} message(s) after they were moved; run the upgrade again")]
    NotDrained(String, u32),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl From<lapin::Error> for UpgradeError {
    fn from(error: lapin::Error) -> Self {
        UpgradeError::Broker(error.into())
    }
}

/// Declares the whole topology, upgrading the queues whose declaration changed.
pub async fn upgrade(
    connection: &Connection,
    topology: &Topology,
) -> Result<Upgraded, UpgradeError> {
    let mut upgraded = Upgraded::default();
    for queue in &topology.queues {
        let probe = connection.create_channel().await?;
        let moved = match declare_queue(&probe, queue).await {
            Ok(()) => {
                let _ = probe.close(200, "declared".into()).await;
                finish_interrupted(connection, queue).await?
            }
            // 406: it exists with other arguments (the channel is closed by the broker).
            Err(error) if super::is_refused_declaration(&error) => {
                Some(rebuild(connection, queue).await?)
            }
            Err(error) => return Err(error.into()),
        };
        if let Some(moved) = moved {
            upgraded.queues.push((queue.name.clone(), moved));
        }
    }
    topology.declare(connection).await?;
    Ok(upgraded)
}

/// Empties `queue` into a temporary queue, declares it anew and moves the messages back. The
/// temporary queue takes the queue's binding first, so commands published meanwhile are kept
/// too (one published while both are bound arrives twice, which idempotency absorbs).
async fn rebuild(connection: &Connection, queue: &QueueSpec) -> Result<usize, UpgradeError> {
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        durable: true,
        ..Default::default()
    };
    let old = channel
        .queue_declare(queue.name.as_str().into(), passive, FieldTable::default())
        .await?;
    if old.consumer_count() > 0 {
        return Err(UpgradeError::InUse(
            queue.name.clone(),
            old.consumer_count(),
        ));
    }
    let holding = holding_queue(queue);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(holding.as_str().into(), durable, args)
        .await?;
    if let Some((exchange, key)) = queue.binding() {
        bind(&channel, &holding, exchange, key).await?;
        channel
            .queue_unbind(
                queue.name.as_str().into(),
                exchange.into(),
                key.into(),
                FieldTable::default(),
            )
            .await?;
    }
    let moved = transfer(connection, &channel, &queue.name, &holding, queue.holds).await?;
    delete_drained(&channel, &queue.name).await?;
    declare_queue(&channel, queue).await?;
    move_back(connection, &channel, queue, &holding).await?;
    Ok(moved)
}

fn holding_queue(queue: &QueueSpec) -> String {
    format!("{}.upgrading", queue.name)
}

/// A queue declared anew by an upgrade that stopped before it moved the messages back: the
/// holding queue is still there, and its messages go back now.
async fn finish_interrupted(
    connection: &Connection,
    queue: &QueueSpec,
) -> Result<Option<usize>, UpgradeError> {
    let channel = connection.create_channel().await?;
    let holding = holding_queue(queue);
    match count(&channel, &holding).await {
        Ok(_) => Ok(Some(
            move_back(connection, &channel, queue, &holding).await?,
        )),
        // 404: no upgrade was interrupted here (the broker closed the channel).
        Err(error) if error.is_amqp_soft_error() => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// The second half of an upgrade: the holding queue's messages go to the queue declared anew.
async fn move_back(
    connection: &Connection,
    channel: &Channel,
    queue: &QueueSpec,
    holding: &str,
) -> Result<usize, UpgradeError> {
    if let Some((exchange, key)) = queue.binding() {
        channel
            .queue_unbind(
                holding.into(),
                exchange.into(),
                key.into(),
                FieldTable::default(),
            )
            .await?;
    }
    let moved = transfer(connection, channel, holding, &queue.name, queue.holds).await?;
    delete_drained(channel, holding).await?;
    let _ = channel.close(200, "upgraded".into()).await;
    Ok(moved)
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
) -> Result<(), lapin::Error> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Deletes a queue nothing is routed to any more, once it is empty (quorum queues have no
/// "delete if empty").
async fn delete_drained(channel: &Channel, queue: &str) -> Result<(), UpgradeError> {
    let left = count(channel, queue).await?;
    if left > 0 {
        return Err(UpgradeError::NotDrained(queue.to_owned(), left));
    }
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    Ok(())
}

/// Moves every message of `from` to the queue `to` (through the default exchange), each
/// confirmed before it is acked; the worker's copies lose their clear token. Read with a
/// consumer: quorum queues with a single active consumer refuse `basic.get`.
async fn transfer(
    connection: &Connection,
    channel: &Channel,
    from: &str,
    to: &str,
    holds: Holds,
) -> Result<usize, UpgradeError> {
    let publisher = confirm_channel(connection).await?;
    let reader = connection.create_channel().await?;
    reader.basic_qos(100, BasicQosOptions::default()).await?;
    let mut consumer = reader
        .basic_consume(
            from.into(),
            "chat-delete-worker upgrade".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut moved = 0;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(1), consumer.next()).await;
        let delivery = match next {
            Ok(Some(delivery)) => delivery?,
            Ok(None) => break,
            // Nothing for a second: done when the queue says it is empty.
            Err(_) if count(channel, from).await? == 0 => break,
            Err(_) => continue,
        };
        let mut props = delivery.properties.clone();
        if holds == Holds::Copies {
            let headers = props.headers().clone().unwrap_or_default();
            let instance = text_header(&headers, ORIGINAL_ROUTING_KEY_HEADER)
                .unwrap_or_else(|| delivery.routing_key.to_string());
            let id = props.message_id().as_ref().map(|s| s.to_string());
            props = without_token(
                &props,
                &instance,
                id.as_deref().unwrap_or(""),
                &delivery.data,
            );
        }
        publish_confirmed(&publisher, "", to, &delivery.data, props).await?;
        delivery.ack(BasicAckOptions::default()).await?;
        moved += 1;
    }
    let _ = reader.close(200, "moved".into()).await;
    let _ = publisher.close(200, "moved".into()).await;
    Ok(moved)
}

/// The messages ready in `queue`.
async fn count(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        durable: true,
        ..Default::default()
    };
    Ok(channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?
        .message_count())
}
