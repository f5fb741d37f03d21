//! A consumer's prefetch, sized by what arrives. lapin holds every delivery whole in memory
//! before we see it, and RabbitMQ has no byte-based prefetch, so the number of deliveries the
//! broker may push ahead is the only bound on their bytes. A queue starts at a prefetch of 1
//! and multiplies it by 8 after each window of ordinary commands, up to the configured
//! prefetch; a delivery over the body limit (it will be answered `400` anyway) brings it back
//! to 1. A run of oversized messages therefore holds about one at a time per queue, and a
//! stream of ordinary commands reaches full speed within a few dozen of them.
//!
//! RabbitMQ applies `basic.qos` only to consumers started after it, so each change restarts the
//! queue's consumer ([`super::consume`]); steps of 8 keep that to three restarts per ramp.

const STEP: u16 = 8;

pub struct Prefetch {
    current: u16,
    max: u16,
    /// Ordinary deliveries since the last change.
    ordinary: u32,
    /// A delivery larger than this is oversized.
    largest_ordinary: usize,
}

impl Prefetch {
    /// A queue's prefetch, starting at 1.
    pub fn new(max: u16, largest_ordinary: usize) -> Self {
        Self {
            current: 1,
            max: max.max(1),
            ordinary: 0,
            largest_ordinary,
        }
    }

    pub fn current(&self) -> u16 {
        self.current
    }

    /// Takes the size of a delivery that arrived into account; returns the new prefetch when
    /// it changes.
    pub fn saw(&mut self, size: usize) -> Option<u16> {
        let next = if size > self.largest_ordinary {
            self.ordinary = 0;
            1
        } else {
            self.ordinary += 1;
            if self.ordinary < u32::from(self.current) || self.current == self.max {
                return None;
            }
            self.ordinary = 0;
            self.current.saturating_mul(STEP).min(self.max)
        };
        (next != self.current).then(|| {
            self.current = next;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_deliveries_ramp_up_in_three_steps_and_an_oversized_one_drops_to_one() {
        let mut prefetch = Prefetch::new(500, 100);
        let changes: Vec<u16> = (0..200).filter_map(|_| prefetch.saw(10)).collect();
        assert_eq!(changes, [8, 64, 500]);
        assert_eq!(prefetch.saw(101), Some(1));
        assert_eq!(prefetch.saw(101), None);
        assert_eq!(prefetch.saw(10), Some(8));
    }
}
