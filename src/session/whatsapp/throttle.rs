//! WhatsApp's 429 (rate-overlimit), as a stream error or a refused connect: seen, counted and
//! obeyed. While it lasts, deletes are not sent (each answers a retryable error, so commands
//! wait in the broker's retry tiers); the wait doubles while 429s keep coming.

use std::time::Duration;

use tokio::time::Instant;
use whatsapp_rust::prelude::Event;
use whatsapp_rust::types::events::ConnectFailureReason;

const FIRST: Duration = Duration::from_secs(30);
const LONGEST: Duration = Duration::from_secs(600);

#[derive(Debug, Default)]
pub(super) struct Throttle {
    until: Option<Instant>,
    step: Duration,
}

impl Throttle {
    /// A 429 arrived: the wait starts, or doubles when one is still running. Returns it.
    pub fn hit(&mut self, now: Instant) -> Duration {
        self.step = match self.left(now) {
            Some(_) => (self.step * 2).min(LONGEST),
            None => FIRST,
        };
        self.until = Some(now + self.step);
        self.step
    }

    /// What is left of the wait, while there is one.
    pub fn left(&self, now: Instant) -> Option<Duration> {
        self.until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }
}

/// Whether the event is WhatsApp's 429.
pub(super) fn is_throttling(event: &Event) -> bool {
    match event {
        Event::StreamError(error) => error.code == "429",
        Event::ConnectFailure(failure) => failure.reason == ConnectFailureReason::Unknown(429),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_while_429s_keep_coming_and_starts_over_after() {
        let mut throttle = Throttle::default();
        let start = Instant::now();
        assert_eq!(throttle.left(start), None);
        assert_eq!(throttle.hit(start), FIRST);
        assert_eq!(throttle.hit(start + Duration::from_secs(10)), FIRST * 2);
        assert_eq!(
            throttle.left(start + Duration::from_secs(10)),
            Some(FIRST * 2)
        );
        let mut later = start;
        for _ in 0..10 {
            later += Duration::from_secs(1);
            throttle.hit(later);
        }
        assert_eq!(throttle.left(later), Some(LONGEST));
        let after = later + LONGEST + Duration::from_secs(1);
        assert_eq!(throttle.left(after), None);
        assert_eq!(throttle.hit(after), FIRST);
    }
}
