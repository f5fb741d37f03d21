//! RabbitMQ: connecting ([`connect()`]), declaring the topology ([`topology`]), publishing with
//! confirms ([`publisher`]), consuming ([`consume`]) and settling each delivery once its
//! verdict is carried out ([`settle`]).

pub mod connect;
pub mod consume;
pub mod publisher;
pub mod settle;
pub mod topology;

pub use connect::connect;
pub use publisher::Publisher;

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
