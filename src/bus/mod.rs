//! RabbitMQ: connecting ([`connect()`]), declaring the topology ([`topology`]), publishing with
//! confirms ([`publisher`], and [`reply`] for `reply_to` copies), consuming ([`consume`]) and settling each delivery once its
//! verdict is carried out ([`settle`]).

pub mod capacity;
pub mod confirm;
pub mod connect;
pub mod consume;
pub mod management;
pub mod policies;
pub mod prefetch;
pub mod publisher;
pub mod reply;
pub mod settle;
pub mod topology;
pub mod upgrade;

pub use connect::connect;
pub use publisher::Publisher;

use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};

/// A consumer of a stream queue from its first entry, on a channel of its own, taking
/// `credit` entries at a time. Reading a stream is not a delivery: it can be done again.
pub async fn read_stream(
    connection: &lapin::Connection,
    queue: &str,
    credit: u16,
) -> Result<(lapin::Channel, lapin::Consumer), lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(credit, BasicQosOptions::default())
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString("first".into()),
    );
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await?;
    Ok((channel, consumer))
}

/// Whether the broker refused a declaration because the queue or exchange exists with other
/// arguments (406 PRECONDITION_FAILED): only a changed declaration fixes that. Other channel
/// errors while declaring pass with time, such as a quorum queue or stream whose node is still
/// starting after a broker restart (404 "home node ... is down or inaccessible").
pub fn is_refused_declaration(error: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e)
        if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker address: {0}")]
    Url(String),
    #[error("cannot apply the queue policies: {0}")]
    Policy(String),
    #[error("cannot read TLS file {0}: {1}")]
    TlsFile(String, std::io::Error),
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    #[error(
        "the broker closed the TLS connection ({0}); if its listener requires a client certificate, set broker.client_identity_file"
    )]
    TlsClosed(lapin::Error),
    #[error("the broker refused the result event (nack)")]
    Nacked,
    /// The broker refused a declaration: usually a queue or exchange that exists with other
    /// arguments (declared by an earlier version, or another config). Retrying will not change
    /// that; `topology --upgrade` will, for an earlier version's queues.
    #[error(
        "the broker refused the topology: a queue or exchange exists with other arguments. If an earlier version declared it, stop every worker and run `chat-delete-worker topology --upgrade` once ({0})"
    )]
    Topology(lapin::Error),
    /// The queues to declare would use up the broker's file handles: declaring them anyway
    /// leaves the broker accepting no connection at all.
    #[error("not declaring the topology: {0}")]
    Capacity(capacity::Shortfall),
    #[error("no queue is bound to {0}")]
    Unroutable(String),
    #[error("the broker connection was lost")]
    ConnectionLost,
    #[error("the broker stopped feeding the consumer of {0}: commands wait there while it idles")]
    ConsumerStalled(String),
    #[error("the broker did not answer on the consuming connection within {0} ms")]
    Unanswered(u64),
}

impl BrokerError {
    /// Everything but a bad address, a bad TLS file, a refused topology or a broker short of
    /// file handles can succeed on another try.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            BrokerError::Url(_)
                | BrokerError::TlsFile(..)
                | BrokerError::Topology(_)
                | BrokerError::Capacity(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use lapin::protocol::{AMQPError, AMQPSoftError};

    use super::*;

    fn soft(error: AMQPSoftError, text: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(AMQPError::new(error.into(), text.into())).into()
    }

    /// The defect: any channel error while declaring was taken for a changed declaration, so a
    /// worker that reconnected while the restarted broker was still starting its queues exited
    /// ("the broker refused the topology") instead of trying again.
    #[test]
    fn only_a_precondition_failure_is_a_refused_declaration() {
        let changed = soft(AMQPSoftError::PRECONDITIONFAILED, "inequivalent arg");
        assert!(is_refused_declaration(&changed));
        let starting = soft(
            AMQPSoftError::NOTFOUND,
            "home node 'rabbit@localhost' of durable queue 'x' in vhost '/' is down or inaccessible",
        );
        assert!(!is_refused_declaration(&starting));
    }
}
