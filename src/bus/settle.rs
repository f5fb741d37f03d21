//! Carrying out a verdict and settling the delivery: the result (and a parked copy) or a
//! delayed retry is published with confirms, and only then is the delivery acked. One function,
//! [`settle_for`], decides ack or requeue.

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};

use super::{BrokerError, Publisher};
use crate::auth::TokenProof;
use crate::auth::envelope::Envelope;
use crate::config::TokenHash;
use crate::contract::wire::{
    ATTEMPTS_SO_FAR_HEADER, ORIGINAL_ROUTING_KEY_HEADER, PARKED_OUTCOME_HEADER,
    PARKED_STATUS_HEADER, RETRIES_HEADER, TOKEN_HEADER, TOKEN_PROOF_HEADER, string_header,
    with_headers,
};
use crate::contract::{EventContext, Names, render};
use crate::pipeline::{Handled, Verdict};
use crate::telemetry::traces::{self, Attribute, Kind};
use crate::telemetry::{self, CommandLog, CommandMetrics};

/// What happens to a delivery once its handling is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// The result is out: remove the command.
    Ack,
    /// Hand it back to the queue (the result could not be published, or we are stopping).
    Requeue,
}

/// The one place that decides a delivery's fate: acked once everything its verdict asked for
/// is confirmed, handed back when the verdict says so or a publish failed.
pub fn settle_for(carried_out: &Result<Settle, BrokerError>) -> Settle {
    match carried_out {
        Ok(settle) => *settle,
        Err(_) => Settle::Requeue,
    }
}

pub async fn settle(delivery: &Delivery, settle: Settle) {
    let result = match settle {
        Settle::Ack => delivery.ack(BasicAckOptions::default()).await,
        Settle::Requeue => {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
        }
    };
    match result {
        Ok(true) => {}
        // A channel from before a reconnect: the broker has requeued the delivery already.
        Ok(false) => tracing::warn!(
            ?settle,
            "Delivery could not be settled on a stale channel; it will come back."
        ),
        Err(error) => {
            tracing::warn!(?settle, %error, "Settling the delivery failed; it will come back.")
        }
    }
}

/// What carrying out a verdict needs besides the verdict.
pub struct Carrier<'a> {
    pub publisher: &'a Publisher,
    pub names: &'a Names,
    pub metrics: &'a CommandMetrics,
    pub app_id: &'a str,
    pub envelope: &'a Envelope,
    pub instance: &'a str,
    pub delivery: &'a Delivery,
    pub log: &'a CommandLog<'a>,
}

impl Carrier<'_> {
    /// Publishes what the verdict asks for, and says how to settle the delivery then. Every
    /// publish is confirmed before the delivery is acked.
    pub async fn carry_out(&self, verdict: Verdict) -> Result<Settle, BrokerError> {
        match verdict {
            Verdict::Answer {
                handled,
                replayed,
                park,
            } => {
                self.answer(&handled, replayed).await?;
                if park {
                    self.park(&handled).await?;
                }
            }
            Verdict::RetryLater {
                delay_ms,
                tries,
                retries,
            } => self.retry_later(delay_ms, tries, retries).await?,
            Verdict::HandBack => return Ok(Settle::Requeue),
        }
        Ok(Settle::Ack)
    }

    /// Publishes the result event (to the events exchange and `reply_to`).
    async fn answer(&self, handled: &Handled, replayed: bool) -> Result<(), BrokerError> {
        let status = handled.outcome.status();
        traces::annotate(|| {
            vec![
                Attribute::new("chat_delete.status", i64::from(status)),
                Attribute::new("chat_delete.outcome", handled.outcome.label()),
                Attribute::new("chat_delete.attempts", i64::from(handled.attempts)),
                Attribute::new("chat_delete.replayed", replayed),
            ]
        });
        if status >= 500 {
            traces::failed(handled.outcome.label().to_owned());
        }
        let send = async {
            let envelope = self.envelope;
            // Inside the send span: the result names it as its parent.
            let (traceparent, tracestate) = traces::outgoing(
                envelope.traceparent.as_deref(),
                envelope.tracestate.as_deref(),
            );
            let (traceparent, tracestate) = (traceparent.as_deref(), tracestate.as_deref());
            let context = self.context(handled, replayed, traceparent, tracestate);
            let event = render(&handled.outcome, &context);
            traces::annotate(|| {
                vec![
                    Attribute::new("messaging.system", "rabbitmq"),
                    Attribute::new("messaging.operation.type", "send"),
                    Attribute::new("messaging.destination.name", self.names.events_exchange()),
                    Attribute::new(
                        "messaging.rabbitmq.destination.routing_key",
                        event.routing_key.clone(),
                    ),
                ]
            });
            self.publisher
                .publish(event, envelope.reply_to.as_deref())
                .await
        };
        traces::stage("send", Kind::Producer, send).await?;
        self.metrics.completed(&handled.outcome);
        let answered = |level: tracing::Level| {
            let outcome = handled.outcome.label();
            let attempts = handled.attempts;
            self.log.in_span(|| match level {
                tracing::Level::DEBUG => {
                    tracing::debug!(status, outcome, attempts, replayed, "Command answered.")
                }
                _ => tracing::info!(status, outcome, attempts, replayed, "Command answered."),
            })
        };
        // A bulk run answers thousands a second: successes are logged at debug (the metrics
        // count them), everything else at info. The level is checked first so that a success
        // does not make the command's span for nothing.
        if status >= 300 {
            answered(tracing::Level::INFO);
        } else if tracing::enabled!(tracing::Level::DEBUG) {
            answered(tracing::Level::DEBUG);
        }
        Ok(())
    }

    fn context<'c>(
        &'c self,
        handled: &'c Handled,
        replayed: bool,
        traceparent: Option<&'c str>,
        tracestate: Option<&'c str>,
    ) -> EventContext<'c> {
        let envelope = self.envelope;
        EventContext {
            instance: self.instance,
            idempotency_id: envelope.idempotency_id.as_deref(),
            correlation_id: envelope.correlation_id.as_deref(),
            chat: handled.chat.as_ref(),
            attempts: handled.attempts,
            replayed,
            receipt: handled.receipt.as_ref(),
            traceparent,
            tracestate,
            app_id: self.app_id,
            now: chrono::Utc::now(),
        }
    }

    /// Keeps a copy of the command in the parking queue, with its final status and outcome.
    async fn park(&self, handled: &Handled) -> Result<(), BrokerError> {
        let status = handled.outcome.status();
        let label = handled.outcome.label();
        let props = self.with_headers(vec![
            (PARKED_STATUS_HEADER, AMQPValue::LongInt(i32::from(status))),
            (PARKED_OUTCOME_HEADER, AMQPValue::LongString(label.into())),
            (
                ORIGINAL_ROUTING_KEY_HEADER,
                AMQPValue::LongString(self.instance.into()),
            ),
            (
                ATTEMPTS_SO_FAR_HEADER,
                AMQPValue::LongInt(handled.attempts as i32),
            ),
        ]);
        self.publisher
            .publish_confirmed("", &self.names.parked_queue(), &self.delivery.data, props)
            .await?;
        metrics::counter!(telemetry::PARKED).increment(1);
        self.log.in_span(|| {
            tracing::warn!(
                status,
                outcome = label,
                "Command parked after its final failure."
            )
        });
        Ok(())
    }

    /// Sends the command through the retry queue of `delay_ms`, carrying its tries and broker
    /// retries so far.
    async fn retry_later(
        &self,
        delay_ms: u64,
        tries: u32,
        retries: u32,
    ) -> Result<(), BrokerError> {
        let props = self.with_headers(vec![
            (ATTEMPTS_SO_FAR_HEADER, AMQPValue::LongInt(tries as i32)),
            (RETRIES_HEADER, AMQPValue::LongInt(retries as i32)),
        ]);
        // The retry exchange is a fanout: the routing key (the instance, whatever the command
        // was first sent with) survives the dead-lettering back.
        let exchange = self.names.retry_exchange(delay_ms);
        let routed = self
            .publisher
            .publish_confirmed(&exchange, self.instance, &self.delivery.data, props)
            .await?;
        if !routed {
            return Err(BrokerError::Unroutable(exchange));
        }
        metrics::counter!(telemetry::RETRIES, "stage" => "broker").increment(1);
        self.log.in_span(|| {
            tracing::info!(
                delay_ms,
                tries,
                retries,
                "Command will be tried again later."
            )
        });
        Ok(())
    }

    /// The command's properties for a copy the worker keeps (retried, parked), with `set`
    /// applied and no token.
    fn with_headers(&self, set: Vec<(&str, AMQPValue)>) -> BasicProperties {
        let id = self.envelope.idempotency_id.as_deref().unwrap_or_default();
        let props = &self.delivery.properties;
        let copy = without_token(props, self.instance, id, &self.delivery.data);
        let headers = with_headers(copy.headers().as_ref(), set);
        copy.with_headers(headers)
    }
}

/// A command's properties for a copy kept on the broker: the token never rests there. The
/// copy carries a proof made from it instead; a copy of a copy keeps the proof it has.
pub fn without_token(
    props: &BasicProperties,
    instance: &str,
    id: &str,
    body: &[u8],
) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (key, value) in props.headers().iter().flat_map(|h| h.inner()) {
        if key.as_str() != TOKEN_HEADER {
            headers.insert(key.clone(), value.clone());
        }
    }
    let token = props
        .headers()
        .as_ref()
        .and_then(|h| string_header(h, TOKEN_HEADER));
    if let Some(token) = token {
        let proof = TokenProof::new(&TokenHash::of(&token), instance, id, body);
        headers.insert(
            TOKEN_PROOF_HEADER.into(),
            AMQPValue::LongString(proof.to_hex().into()),
        );
    }
    props.clone().with_headers(headers)
}
