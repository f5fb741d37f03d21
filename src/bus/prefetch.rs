//! A consumer's prefetch, sized by what arrives. lapin holds every delivery whole in memory
//! before we see it, and RabbitMQ has no byte-based prefetch, so the number of deliveries the
//! broker may push ahead is the only bound on their bytes. A consumer starts at a prefetch of
//! 1 and doubles it after each window of ordinary commands, up to the configured prefetch; a
//! delivery over the body limit (it will be answered `400` anyway) brings it back to 1. A run
//! of oversized messages therefore holds about one at a time per queue, and a stream of
//! ordinary commands reaches full speed within a few hundred of them.

use lapin::Channel;
use lapin::options::BasicQosOptions;

pub struct Prefetch {
    channel: Channel,
    current: u16,
    max: u16,
    /// Ordinary deliveries since the last change.
    ordinary: u32,
    /// A delivery larger than this is oversized.
    largest_ordinary: usize,
}

impl Prefetch {
    /// Sets the channel's prefetch to 1 (before its consumer starts).
    pub async fn start(
        channel: Channel,
        max: u16,
        largest_ordinary: usize,
    ) -> Result<Self, lapin::Error> {
        channel.basic_qos(1, BasicQosOptions::default()).await?;
        Ok(Self {
            channel,
            current: 1,
            max: max.max(1),
            ordinary: 0,
            largest_ordinary,
        })
    }

    pub fn current(&self) -> u16 {
        self.current
    }

    /// Takes the size of a delivery that arrived into account.
    pub async fn saw(&mut self, size: usize) -> Result<(), lapin::Error> {
        let next = if size > self.largest_ordinary {
            self.ordinary = 0;
            1
        } else {
            self.ordinary += 1;
            if self.ordinary < u32::from(self.current) || self.current == self.max {
                return Ok(());
            }
            self.ordinary = 0;
            self.current.saturating_mul(2).min(self.max)
        };
        if next != self.current {
            self.current = next;
            self.channel
                .basic_qos(next, BasicQosOptions::default())
                .await?;
        }
        Ok(())
    }
}
