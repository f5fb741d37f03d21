//! Publishing with confirms: result events (to the events exchange and `reply_to`) and the
//! worker's own copies of commands (retry and parking).

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::time::Instant;

use super::BrokerError;
use crate::contract::ResultEvent;
use crate::telemetry;

/// A confirm-mode channel for result events.
pub struct Publisher {
    channel: Channel,
    events_exchange: String,
    publish_confirm: metrics::Histogram,
}

impl Publisher {
    pub async fn open(connection: &Connection, events_exchange: &str) -> Result<Self, BrokerError> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            channel,
            events_exchange: events_exchange.to_owned(),
            publish_confirm: telemetry::stage_duration("publish_confirm"),
        })
    }

    /// Publishes `body` and waits for the broker's confirm; `Ok(false)` when it was
    /// unroutable (returned).
    pub async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<bool, BrokerError> {
        let mandatory = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let confirm = self
            .channel
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

    /// Publishes the event to the events exchange and, when asked, to `reply_to`, and returns
    /// once the broker has confirmed both. An unroutable event (nobody bound, reply queue gone)
    /// is confirmed too: it is counted and logged, not retried forever.
    pub async fn publish(
        &self,
        event: ResultEvent,
        reply_to: Option<&str>,
    ) -> Result<(), BrokerError> {
        let started = Instant::now();
        let ResultEvent {
            routing_key,
            body,
            properties,
            ..
        } = event;
        let events = (self.events_exchange.as_str(), routing_key.as_str());
        match reply_to {
            Some(queue) => {
                // Only a second copy needs a clone of the properties (a dozen headers).
                let to_events = self.publish_counted(events, &body, properties.clone(), "events");
                let to_reply = self.publish_counted(("", queue), &body, properties, "reply_to");
                futures_util::try_join!(to_events, to_reply)?;
            }
            None => {
                self.publish_counted(events, &body, properties, "events")
                    .await?
            }
        }
        self.publish_confirm.record(started.elapsed().as_secs_f64());
        Ok(())
    }

    async fn publish_counted(
        &self,
        (exchange, key): (&str, &str),
        body: &[u8],
        properties: BasicProperties,
        target: &'static str,
    ) -> Result<(), BrokerError> {
        if !self
            .publish_confirmed(exchange, key, body, properties)
            .await?
        {
            metrics::counter!(telemetry::RESULTS_UNROUTABLE, "target" => target).increment(1);
            tracing::debug!(target, routing_key = key, "Result event was unroutable.");
        }
        Ok(())
    }
}
