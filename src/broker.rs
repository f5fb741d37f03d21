//! RabbitMQ: connecting (plain or TLS) and publishing result events with confirms.

use tokio::time::Instant;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use crate::config::BrokerConfig;
use crate::contract::ResultEvent;
use crate::telemetry;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot read TLS file {0}: {1}")]
    TlsFile(String, std::io::Error),
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused the result event (nack)")]
    Nacked,
    /// The broker refused a declaration: usually a queue or exchange that exists with other
    /// arguments (another version or config of the worker). Retrying will not change that.
    #[error(
        "the broker refused the topology (does a queue or exchange exist with other arguments?): {0}"
    )]
    Topology(lapin::Error),
    #[error("no queue is bound to {0}")]
    Unroutable(String),
    #[error("the broker connection was lost")]
    ConnectionLost,
}

impl BrokerError {
    /// Everything but a bad TLS file or a refused topology can succeed on another try.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, BrokerError::TlsFile(..) | BrokerError::Topology(_))
    }
}

/// Opens a connection; `amqps://` URLs use the configured CA and client identity.
pub async fn connect(cfg: &BrokerConfig, connection_name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(connection_name.into());
    if cfg.ca_file.is_none() && cfg.client_identity_file.is_none() {
        return Ok(Connection::connect(&cfg.url, props).await?);
    }
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| BrokerError::TlsFile(path.display().to_string(), e))
    };
    let cert_chain = match &cfg.ca_file {
        Some(path) => Some(String::from_utf8_lossy(&read(path)?).into_owned()),
        None => None,
    };
    let identity = match &cfg.client_identity_file {
        Some(path) => Some(OwnedIdentity::PKCS12 {
            der: read(path)?,
            password: cfg.client_identity_password.clone().unwrap_or_default(),
        }),
        None => None,
    };
    let tls = OwnedTLSConfig {
        identity,
        cert_chain,
    };
    let runtime = lapin::runtime::default_runtime()?;
    Ok(Connection::connect_with_config(&cfg.url, props, tls, runtime).await?)
}

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
