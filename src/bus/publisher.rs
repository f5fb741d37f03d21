//! Publishing with confirms: result events (to the events exchange, and their `reply_to`
//! copies through [`super::reply`]) and the worker's own copies of commands (retry and
//! parking).

use std::sync::Arc;

use lapin::{BasicProperties, Channel, Connection};
use tokio::time::Instant;

use super::BrokerError;
use super::confirm::{confirm_channel, publish_confirmed};
use super::reply::ReplyTo;
use crate::contract::ResultEvent;
use crate::telemetry;

/// A confirm-mode channel for result events and command copies; `reply_to` copies go on a
/// channel of their own, so a publisher's bad `reply_to` never closes this one.
pub struct Publisher {
    channel: Channel,
    reply_to: ReplyTo,
    events_exchange: String,
    publish_confirm: metrics::Histogram,
}

impl Publisher {
    pub async fn open(
        connection: &Arc<Connection>,
        events_exchange: &str,
    ) -> Result<Self, BrokerError> {
        Ok(Self {
            channel: confirm_channel(connection).await?,
            reply_to: ReplyTo::new(connection.clone()),
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
        publish_confirmed(&self.channel, exchange, routing_key, body, properties).await
    }

    /// Publishes the event to the events exchange and, when asked, a copy to `reply_to`, and
    /// returns once the broker has confirmed the first. An event nobody is bound for is
    /// confirmed too: it is counted, not retried forever. What becomes of the `reply_to` copy
    /// does not change the outcome.
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
        // Only a second copy needs a clone of the properties (a dozen headers).
        let reply = reply_to.map(|queue| (queue, properties.clone()));
        let to_events = async {
            let exchange = self.events_exchange.as_str();
            let routed = self
                .publish_confirmed(exchange, &routing_key, &body, properties)
                .await?;
            if !routed {
                metrics::counter!(telemetry::RESULTS_UNROUTABLE, "target" => "events").increment(1);
                tracing::debug!(routing_key, "Result event was unroutable.");
            }
            Ok::<(), BrokerError>(())
        };
        match reply {
            Some((queue, properties)) => {
                let to_reply = self.reply_to.publish(queue, &body, properties);
                tokio::join!(to_events, to_reply).0?;
            }
            None => to_events.await?,
        }
        self.publish_confirm.record(started.elapsed().as_secs_f64());
        Ok(())
    }
}
