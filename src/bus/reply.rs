//! The `reply_to` copy of a result, on a channel of its own: a `reply_to` that refuses it
//! (a full queue that rejects publishes, a queue that is gone, access refused, a name the
//! broker will not take) loses that copy only. The command is still answered on the events
//! exchange and acked, the connection stays, and no other command notices. Failures are
//! counted by reason and logged at most once a minute.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use lapin::{BasicProperties, Channel, Connection};
use tokio::time::Instant;

use super::BrokerError;
use super::confirm::{confirm_channel, publish_confirmed};
use crate::telemetry;

/// At most one log line per this much time about failed `reply_to` copies.
const LOG_EVERY: Duration = Duration::from_secs(60);

pub struct ReplyTo {
    connection: Arc<Connection>,
    /// Opened on first use, and again after the broker closed it.
    channel: tokio::sync::Mutex<Option<Channel>>,
    log: Mutex<Window>,
}

/// Failures since the last log line.
struct Window {
    logged_at: Option<Instant>,
    unlogged: u64,
}

/// Why a `reply_to` copy did not arrive: a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyFailure {
    /// No queue by that name.
    Unroutable,
    /// The queue refused it (full with `reject-publish`, ...).
    Nacked,
    /// The broker closed the channel over it (access refused, a reserved name...).
    Refused,
}

impl ReplyFailure {
    fn label(self) -> &'static str {
        match self {
            ReplyFailure::Unroutable => "unroutable",
            ReplyFailure::Nacked => "nacked",
            ReplyFailure::Refused => "refused",
        }
    }
}

impl ReplyTo {
    pub fn new(connection: Arc<Connection>) -> Self {
        Self {
            connection,
            channel: tokio::sync::Mutex::new(None),
            log: Mutex::new(Window {
                logged_at: None,
                unlogged: 0,
            }),
        }
    }

    /// Publishes the copy and waits for its confirm; whatever happens to it stays here.
    pub async fn publish(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        if let Err(failure) = self.try_publish(queue, body, properties).await {
            metrics::counter!(telemetry::REPLY_TO_FAILED, "reason" => failure.label()).increment(1);
            self.note(failure);
        }
    }

    async fn try_publish(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), ReplyFailure> {
        let channel = self.channel().await.ok_or(ReplyFailure::Refused)?;
        match publish_confirmed(&channel, "", queue, body, properties).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(ReplyFailure::Unroutable),
            Err(BrokerError::Nacked) => Err(ReplyFailure::Nacked),
            Err(_) => {
                // The broker closed this channel over the copy: the next one gets a new one.
                *self.channel.lock().await = None;
                Err(ReplyFailure::Refused)
            }
        }
    }

    /// The reply channel, opened (in confirm mode) when there is none or it was closed.
    async fn channel(&self) -> Option<Channel> {
        let mut slot = self.channel.lock().await;
        if let Some(channel) = slot.as_ref()
            && channel.status().connected()
        {
            return Some(channel.clone());
        }
        let channel = confirm_channel(&self.connection).await.ok()?;
        *slot = Some(channel.clone());
        Some(channel)
    }

    /// Logs the failure unless one was logged within the window.
    fn note(&self, failure: ReplyFailure) {
        let mut window = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if window
            .logged_at
            .is_some_and(|at| now.duration_since(at) < LOG_EVERY)
        {
            window.unlogged += 1;
            return;
        }
        let earlier = std::mem::take(&mut window.unlogged);
        window.logged_at = Some(now);
        tracing::warn!(
            reason = failure.label(),
            earlier_in_window = earlier,
            "A result could not be copied to its reply_to; it went to the events exchange only."
        );
    }
}
