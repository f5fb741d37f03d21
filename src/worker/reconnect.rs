//! How long to wait before the next broker connection: 250 ms, doubling up to 5 s, and back to
//! 250 ms after a connection that got as far as consuming; each wait is drawn between half the
//! step and the step (jitter), so replicas that lost the broker together do not reconnect in
//! lockstep.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

const FIRST: Duration = Duration::from_millis(250);
const LONGEST: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Reconnect {
    next: Duration,
    /// Connections made so far (names the next one, so the broker's list tells them apart).
    connections: u64,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            next: FIRST,
            connections: 0,
        }
    }
}

impl Reconnect {
    /// How many connections were made before the next one.
    pub fn connections(&self) -> u64 {
        self.connections
    }

    /// The delay before the connection after one that ended; a connection that consumed was a
    /// good one, so the backoff starts over.
    pub fn delay_after(&mut self, consumed: bool) -> Duration {
        if consumed {
            self.next = FIRST;
        }
        let step = self.next;
        self.next = (self.next * 2).min(LONGEST);
        step / 2 + step.mul_f64(rand::random::<f64>() / 2.0)
    }

    /// Waits out `delay`; false when `stop` came first.
    pub async fn wait(&mut self, delay: Duration, stop: &CancellationToken) -> bool {
        self.connections += 1;
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn doubles_to_five_seconds_and_starts_over_after_a_good_connection() {
        let stop = CancellationToken::new();
        let mut reconnect = Reconnect::default();
        let mut waited = vec![];
        for consumed in [false, false, false, false, false, false, false, true, false] {
            let started = Instant::now();
            let delay = reconnect.delay_after(consumed);
            assert!(reconnect.wait(delay, &stop).await);
            waited.push(started.elapsed().as_millis());
        }
        let steps = [250, 500, 1000, 2000, 4000, 5000, 5000, 250, 500];
        for (waited, step) in waited.iter().zip(steps) {
            assert!(
                (step / 2..=step).contains(waited),
                "waited {waited} ms for a {step} ms step"
            );
        }
        assert_eq!(reconnect.connections(), 9);
    }

    /// The defect: every replica waited exactly 250, 500, 1000... ms, so all reconnected to a
    /// restarted broker at the same moments.
    #[test]
    fn replicas_do_not_reconnect_in_lockstep() {
        let delays: std::collections::BTreeSet<Duration> = (0..20)
            .map(|_| Reconnect::default().delay_after(false))
            .collect();
        assert!(delays.len() > 10, "{delays:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_the_wait_at_once() {
        let stop = CancellationToken::new();
        let mut reconnect = Reconnect::default();
        stop.cancel();
        let started = Instant::now();
        assert!(!reconnect.wait(Duration::from_secs(5), &stop).await);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
