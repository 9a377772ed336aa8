//! How long other nodes' records take to reach this one, measured in the frame that the
//! settle window needs.
//!
//! A claimant waits the settle window before it starts, so that any claim that beats its
//! own (a smaller HLC in the same epoch) has arrived by then. Such a claim was stamped
//! `h` by its writer and reaches this node at local wall time `h + d`, where `d` is its
//! *stamp-to-arrival delay*: the fsync before the push, every hop of the broadcast tree,
//! the queues on the way, and the writer's clock offset from this node's. So if this
//! node's own claim is stamped `h_me`, waiting until its wall clock reads `h_me + S` is
//! enough for every better claim whose `d ≤ S` (the engine counts the window from the
//! claim's stamp for this reason). This module keeps the recent `d` of the control
//! records this node receives by live push (claims, starts, expiries) and answers a high
//! quantile of them.
//!
//! It replaced an estimate from probe round trips: half a round trip, taken as mean plus
//! four deviations, times the overlay's depth, doubled for clock skew. Every factor there
//! was an upper bound and they multiplied; in a takeover on two cores (20 nodes, depth 6)
//! it reached the 500 ms cap, and the settle window alone was up to half of the MTTR (E3
//! at 20 agents, killed mid-run: start after claim p95 501 ms, 153 ms with this). The
//! records measure the path itself, skew included, so nothing has to be assumed. Where the
//! path really is that slow — right after a burst of submissions, records took 250–500 ms
//! to arrive (p99) — the measured window is as long: it follows the load, it does not
//! hide it.
//!
//! Samples older than [`WINDOW_MS`] are dropped, so the estimate follows the load; with
//! fewer than [`MIN_SAMPLES`] recent ones it answers nothing and the driver falls back to
//! the round-trip estimate. Records that arrive very late (after a partition, through
//! anti-entropy) say nothing about claims racing now; samples above [`MAX_SAMPLE_MS`]
//! are ignored.

use std::collections::VecDeque;

use crate::hlc::Hlc;

/// Samples kept at most.
pub const MAX_SAMPLES: usize = 512;
/// Samples older than this (local ms) are dropped. Short, because load comes in bursts:
/// with 10 s, a takeover right after a burst of submissions waited out the burst's
/// delays (E3 at 20 agents: a 375 ms settle window while the takeover's own records
/// arrived within 100 ms, p99). A takeover's expiries arrive before its claims, so they
/// refill the window in time.
pub const WINDOW_MS: u64 = 2_000;
/// Below this many recent samples the meter has no estimate.
pub const MIN_SAMPLES: usize = 16;
/// Samples above this are ignored: a record this late came another way than a live push.
pub const MAX_SAMPLE_MS: u64 = 10_000;
/// The quantile answered, in per mille.
pub const QUANTILE_PER_MILLE: usize = 990;

/// Recent stamp-to-arrival delays of other nodes' records.
#[derive(Debug, Clone, Default)]
pub struct PropagationMeter {
    /// (local arrival ms, delay ms), oldest first.
    samples: VecDeque<(u64, u64)>,
}

impl PropagationMeter {
    /// An empty meter.
    pub fn new() -> PropagationMeter {
        PropagationMeter::default()
    }

    /// A record stamped `stamp` by another node arrived now. A stamp ahead of this node's
    /// clock counts as no delay.
    pub fn observe(&mut self, now_ms: u64, stamp: Hlc) {
        let delay_ms = now_ms.saturating_sub(stamp.as_millis());
        if delay_ms > MAX_SAMPLE_MS {
            return;
        }
        if self.samples.len() >= MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((now_ms, delay_ms));
    }

    /// The [`QUANTILE_PER_MILLE`] quantile of the delays seen in the last [`WINDOW_MS`], or
    /// `None` with fewer than [`MIN_SAMPLES`] of them.
    pub fn estimate_ms(&mut self, now_ms: u64) -> Option<u64> {
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| at.saturating_add(WINDOW_MS) < now_ms)
        {
            self.samples.pop_front();
        }
        if self.samples.len() < MIN_SAMPLES {
            return None;
        }
        let mut delays: Vec<u64> = self.samples.iter().map(|(_, d)| *d).collect();
        let k = (delays.len() * QUANTILE_PER_MILLE / 1_000).min(delays.len() - 1);
        let (_, q, _) = delays.select_nth_unstable(k);
        Some(*q)
    }

    /// Samples held.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True iff it holds no sample.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter_with(now_ms: u64, delays: &[u64]) -> PropagationMeter {
        let mut m = PropagationMeter::new();
        for d in delays {
            m.observe(now_ms, Hlc::from_millis(now_ms - d));
        }
        m
    }

    #[test]
    fn no_estimate_below_min_samples() {
        let mut m = meter_with(100_000, &[5; MIN_SAMPLES - 1]);
        assert_eq!(m.estimate_ms(100_000), None);
        m.observe(100_000, Hlc::from_millis(99_995));
        assert_eq!(m.estimate_ms(100_000), Some(5));
    }

    #[test]
    fn answers_a_high_quantile_not_the_mean() {
        // 98 fast records and two slow ones: the 99th percentile is a slow one.
        let mut delays = vec![3u64; 98];
        delays.extend([40, 200]);
        let mut m = meter_with(100_000, &delays);
        assert_eq!(m.estimate_ms(100_000), Some(200));
        // With 1,000 samples one slow record is below the quantile.
        let mut delays = vec![3u64; 500];
        delays.push(400);
        let mut m = meter_with(100_000, &delays);
        assert_eq!(m.estimate_ms(100_000), Some(3));
    }

    #[test]
    fn old_samples_age_out() {
        let mut m = meter_with(100_000, &[300; 64]);
        assert_eq!(m.estimate_ms(100_000), Some(300));
        for _ in 0..MIN_SAMPLES {
            m.observe(
                100_000 + WINDOW_MS,
                Hlc::from_millis(100_000 + WINDOW_MS - 4),
            );
        }
        assert_eq!(m.estimate_ms(100_000 + WINDOW_MS + 1), Some(4));
        assert_eq!(m.estimate_ms(100_000 + 3 * WINDOW_MS), None);
        assert!(m.is_empty());
    }

    #[test]
    fn late_records_and_fast_clocks() {
        let mut m = PropagationMeter::new();
        // Through anti-entropy after a partition: ignored.
        m.observe(100_000, Hlc::from_millis(100_000 - MAX_SAMPLE_MS - 1));
        assert!(m.is_empty());
        // A writer whose clock is ahead of ours: no delay, not a huge one.
        for _ in 0..MIN_SAMPLES {
            m.observe(100_000, Hlc::from_millis(100_250));
        }
        assert_eq!(m.estimate_ms(100_000), Some(0));
    }

    #[test]
    fn keeps_at_most_max_samples() {
        let m = meter_with(100_000, &vec![1; MAX_SAMPLES + 10]);
        assert_eq!(m.len(), MAX_SAMPLES);
    }
}
