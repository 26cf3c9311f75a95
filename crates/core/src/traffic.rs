//! Byte counters per round and per direction, shared by every request handler.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Coordinator to worker: model downloads.
    Down,
    /// Worker to coordinator: update uploads.
    Up,
}

/// Bytes of one round in each direction, counting every byte of the gRPC payloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficSnapshot {
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// Counters of the round in progress plus the totals of finished rounds.
#[derive(Debug, Default)]
pub struct TrafficCounters {
    up: AtomicU64,
    down: AtomicU64,
    totals: Mutex<TrafficSnapshot>,
}

impl TrafficCounters {
    pub fn with_totals(totals: TrafficSnapshot) -> Self {
        Self {
            totals: Mutex::new(totals),
            ..Self::default()
        }
    }

    pub fn add(&self, direction: Direction, bytes: u64) {
        match direction {
            Direction::Up => self.up.fetch_add(bytes, Ordering::Relaxed),
            Direction::Down => self.down.fetch_add(bytes, Ordering::Relaxed),
        };
    }

    /// Closes the round: returns its bytes, adds them to the totals and resets the round counters.
    pub fn finish_round(&self) -> TrafficSnapshot {
        let round = TrafficSnapshot {
            bytes_up: self.up.swap(0, Ordering::Relaxed),
            bytes_down: self.down.swap(0, Ordering::Relaxed),
        };
        let mut totals = self
            .totals
            .lock()
            .expect("traffic totals lock is never poisoned");
        totals.bytes_up += round.bytes_up;
        totals.bytes_down += round.bytes_down;
        round
    }

    /// Totals of the finished rounds plus the round in progress.
    pub fn totals(&self) -> TrafficSnapshot {
        let totals = *self
            .totals
            .lock()
            .expect("traffic totals lock is never poisoned");
        TrafficSnapshot {
            bytes_up: totals.bytes_up + self.up.load(Ordering::Relaxed),
            bytes_down: totals.bytes_down + self.down.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_rounds_sum_into_totals() {
        let counters = TrafficCounters::default();
        counters.add(Direction::Up, 10);
        counters.add(Direction::Down, 100);
        counters.add(Direction::Up, 5);
        let first = counters.finish_round();
        assert_eq!(
            first,
            TrafficSnapshot {
                bytes_up: 15,
                bytes_down: 100
            }
        );

        counters.add(Direction::Down, 7);
        assert_eq!(
            counters.totals(),
            TrafficSnapshot {
                bytes_up: 15,
                bytes_down: 107
            }
        );
        let second = counters.finish_round();
        assert_eq!(
            second,
            TrafficSnapshot {
                bytes_up: 0,
                bytes_down: 7
            }
        );
    }
}
