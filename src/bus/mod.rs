//! RabbitMQ: connecting ([`connect()`]), declaring the topology ([`topology`]), publishing with
//! confirms ([`publisher`], and [`reply`] for `reply_to` copies), consuming ([`consume`]) and settling each delivery once its
//! verdict is carried out ([`settle`]).

pub mod connect;
pub mod consume;
pub mod prefetch;
pub mod publisher;
pub mod reply;
pub mod settle;
pub mod topology;
pub mod upgrade;

pub use connect::connect;
pub use publisher::Publisher;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
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
