//! Publishing with publisher confirms: a channel in confirm mode, and one publish awaited until
//! the broker confirms it. Used by the result publisher, the `reply_to` copies, the topology
//! upgrade and the parking tools.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use super::BrokerError;

/// Publishes `body` on a confirm-mode channel and waits for the broker's confirm; `Ok(false)`
/// when it was unroutable (returned).
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<bool, BrokerError> {
    let mandatory = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            mandatory,
            body,
            properties,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(returned) => Ok(returned.is_none()),
        // The channel is put in confirm mode on open; no confirm means it was not.
        Confirmation::Nack(_) | Confirmation::NotRequested => Err(BrokerError::Nacked),
    }
}

/// A channel in confirm mode.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}
