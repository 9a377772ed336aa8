//! Hybrid logical clocks, as pure functions of (state, physical time).
//!
//! Timestamps use `uhlc`'s 64-bit NTP representation ([`uhlc::NTP64`]: 32 bits of seconds,
//! 32 bits of fraction, the lowest [`COUNTER_BITS`] bits a logical counter) and follow
//! `uhlc::HLC`'s update rules. We do not call `uhlc::HLC` itself because it reads its
//! physical clock through a `fn()` pointer: the core takes time as an *input* (so the
//! simulator can run thousands of nodes with skewed clocks in one thread), and a function
//! pointer cannot carry a per-node simulated clock without global state.
//!
//! The drift bound is the defence against one bad clock winning every claim: a remote
//! timestamp more than `max_drift_ms` ahead of local physical time is rejected, not merged
//! (invariant 8 in `docs/invariants.md`).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uhlc::NTP64;

/// Low bits of a timestamp used as a logical counter (the same split as `uhlc`).
pub const COUNTER_BITS: u32 = 4;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;
const PHYSICAL_MASK: u64 = !COUNTER_MASK;

/// Default drift bound: remote timestamps further ahead than this are refused.
pub const DEFAULT_MAX_DRIFT_MS: u64 = 500;

/// A hybrid-logical-clock timestamp (NTP64 encoding). Totally ordered.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Hlc(pub u64);

impl Hlc {
    /// The timestamp whose physical part is `ms` milliseconds since the epoch of the
    /// caller's physical clock, with a zero counter.
    pub fn from_millis(ms: u64) -> Hlc {
        Hlc(NTP64::from(Duration::from_millis(ms)).as_u64() & PHYSICAL_MASK)
    }

    /// The physical part, in milliseconds (rounded to the nearest: physical inputs are
    /// whole milliseconds, and the NTP fraction cannot hold a millisecond exactly).
    pub fn as_millis(self) -> u64 {
        let ntp = NTP64(self.0);
        let frac = self.0 & 0xffff_ffff;
        u64::from(ntp.as_secs()) * 1_000 + ((frac * 1_000 + (1 << 31)) >> 32)
    }
}

impl fmt::Debug for Hlc {
    /// `<whole ms>ms+<NTP units past that ms>`: two timestamps in the same millisecond
    /// print in their true order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let frac = self.0 & 0xffff_ffff;
        let floor_ms = u64::from(NTP64(self.0).as_secs()) * 1_000 + ((frac * 1_000) >> 32);
        let base = NTP64::from(Duration::from_millis(floor_ms)).as_u64() & PHYSICAL_MASK;
        write!(f, "{floor_ms}ms+{}", self.0.wrapping_sub(base))
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A remote timestamp was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "timestamp {remote_ms} ms is {ahead_ms} ms ahead of local time {local_ms} ms (bound {max_drift_ms} ms)"
)]
pub struct ClockError {
    /// Physical part of the remote timestamp.
    pub remote_ms: u64,
    /// Local physical time.
    pub local_ms: u64,
    /// How far ahead the remote timestamp is.
    pub ahead_ms: u64,
    /// The configured bound.
    pub max_drift_ms: u64,
}

/// One node's hybrid logical clock. Its only state is the last timestamp it issued or saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HlcClock {
    last: Hlc,
    max_drift: u64,
    max_drift_ms: u64,
}

impl HlcClock {
    /// A clock that refuses remote timestamps more than `max_drift_ms` ahead.
    pub fn new(max_drift_ms: u64) -> HlcClock {
        HlcClock {
            last: Hlc(0),
            max_drift: NTP64::from(Duration::from_millis(max_drift_ms)).as_u64(),
            max_drift_ms,
        }
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A new timestamp, strictly greater than every one issued or observed before.
    pub fn now(&mut self, physical_ms: u64) -> Hlc {
        let phys = Hlc::from_millis(physical_ms);
        self.last = if phys.0 > (self.last.0 & PHYSICAL_MASK) {
            phys
        } else {
            Hlc(self.last.0.saturating_add(1))
        };
        self.last
    }

    /// Checks `remote` against the drift bound without changing the clock.
    pub fn check(&self, remote: Hlc, physical_ms: u64) -> Result<(), ClockError> {
        let phys = Hlc::from_millis(physical_ms);
        if remote.0 > phys.0 && remote.0 - phys.0 > self.max_drift {
            return Err(ClockError {
                remote_ms: remote.as_millis(),
                local_ms: physical_ms,
                ahead_ms: remote.as_millis().saturating_sub(physical_ms),
                max_drift_ms: self.max_drift_ms,
            });
        }
        Ok(())
    }

    /// Merges a remote timestamp: afterwards every new timestamp is greater than it.
    /// A timestamp beyond the drift bound is refused and leaves the clock unchanged.
    pub fn observe(&mut self, remote: Hlc, physical_ms: u64) -> Result<(), ClockError> {
        self.check(remote, physical_ms)?;
        let phys = Hlc::from_millis(physical_ms);
        let max = phys.max(remote).max(self.last);
        self.last = if max == phys {
            phys
        } else if max == remote {
            Hlc(remote.0.saturating_add(1))
        } else {
            Hlc(self.last.0.saturating_add(1))
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_far_future_and_keeps_state() {
        let mut c = HlcClock::new(100);
        let t0 = c.now(1_000);
        let err = c.observe(Hlc::from_millis(1_200), 1_000).unwrap_err();
        assert_eq!(err.ahead_ms, 200);
        assert_eq!(c.last(), t0);
        c.observe(Hlc::from_millis(1_050), 1_000).unwrap();
        assert!(c.now(1_000) > Hlc::from_millis(1_050));
    }

    #[test]
    fn millis_round_trip() {
        for ms in [0u64, 1, 999, 1_000, 123_456_789] {
            assert_eq!(Hlc::from_millis(ms).as_millis(), ms);
        }
    }
}
