//! The registry's statistics: live segments and bytes, and the node counts
//! that tests and the soak read.
//!
//! They are statistics, outside the protocol: plain `std` atomics with
//! Relaxed ordering (nothing is ordered by them), even under loom. The
//! counters every track and untrack bumps are sharded by thread, each shard
//! on its own cache line, so that threads churning at once do not all
//! write one line; readers add the shards up (weakly consistent, exact once
//! the registry is quiescent).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// Shards of the hot counters (a power of two).
const SHARDS: usize = 16;

/// One thread's share of the hot counters, alone on its cache line (two
/// lines: adjacent-line prefetch pairs them on x86).
#[derive(Default)]
#[repr(align(128))]
struct Shard {
    allocated: AtomicU64,
    retired: AtomicU64,
    freed: AtomicU64,
    /// Wrapping: a thread may untrack what another tracked, so one shard
    /// can go "below zero"; the wrapping sum of all shards is exact.
    live_segments: AtomicUsize,
    live_bytes: AtomicUsize,
}

/// The shard of the calling thread: threads are numbered in the order they
/// first touch any registry.
fn my_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

/// See the module documentation.
#[derive(Default)]
pub(crate) struct Counters {
    shards: [Shard; SHARDS],
    /// Dead nodes that became sweepable since the last sweep (decides when
    /// untrack sweeps; one shared word, reset by each sweep).
    pub(crate) unswept: AtomicUsize,
    /// The sweep threshold `max(slack, live / 2)` as last computed, and the
    /// unswept count it was computed at (see [`sweep_due`](Self::sweep_due)).
    threshold: AtomicUsize,
    checked_at: AtomicUsize,
    /// Sweeps run.
    pub(crate) sweeps: AtomicU64,
    /// Log nodes visited by passes.
    pub(crate) pass_steps: AtomicU64,
}

impl Counters {
    fn mine(&self) -> &Shard {
        &self.shards[my_shard()]
    }

    fn sum<T>(&self, f: impl Fn(&Shard) -> T) -> T
    where
        T: std::iter::Sum<T>,
    {
        self.shards.iter().map(f).sum()
    }

    /// Whether an untrack that brought the unswept count to `unswept` must
    /// sweep: `unswept > max(slack, live / 2)` (DESIGN.md, "Bounded
    /// memory").
    ///
    /// Adding up the live count reads every shard, so it is done only while
    /// `unswept` is at most 64, once it passes the last threshold computed,
    /// and once it is 64 past the count that threshold was computed at
    /// (other increments, from hold releases and unpins, do not check, so
    /// "every 64th" is measured, not hit exactly). In between the last
    /// threshold stands in; it is stale only if the live count fell since,
    /// so a sweep comes at most 64 untracks later than the exact rule says.
    pub(crate) fn sweep_due(&self, unswept: usize, slack: usize) -> bool {
        if unswept <= slack {
            return false;
        }
        if unswept > 64
            && unswept <= self.threshold.load(Relaxed)
            && unswept < self.checked_at.load(Relaxed).saturating_add(64)
        {
            return false;
        }
        let threshold = slack.max(self.live_segments() / 2);
        self.threshold.store(threshold, Relaxed);
        self.checked_at.store(unswept, Relaxed);
        unswept > threshold
    }

    /// A sweep starts: the unswept count starts again from zero.
    pub(crate) fn sweep_started(&self) {
        self.unswept.store(0, Relaxed);
        self.checked_at.store(0, Relaxed);
        self.sweeps.fetch_add(1, Relaxed);
    }

    /// A node was allocated.
    pub(crate) fn allocated(&self) {
        self.mine().allocated.fetch_add(1, Relaxed);
    }

    /// A node was handed to the reclaimer.
    pub(crate) fn retired(&self) {
        self.mine().retired.fetch_add(1, Relaxed);
    }

    /// A node was freed.
    pub(crate) fn freed(&self) {
        self.mine().freed.fetch_add(1, Relaxed);
    }

    /// A segment of `len` bytes became tracked.
    pub(crate) fn tracked(&self, len: usize) {
        let s = self.mine();
        s.live_segments.fetch_add(1, Relaxed);
        s.live_bytes.fetch_add(len, Relaxed);
    }

    /// A segment of `len` bytes was untracked.
    pub(crate) fn untracked(&self, len: usize) {
        let s = self.mine();
        s.live_segments.fetch_sub(1, Relaxed);
        s.live_bytes.fetch_sub(len, Relaxed);
    }

    /// Nodes allocated so far.
    pub(crate) fn allocated_total(&self) -> u64 {
        self.sum(|s| s.allocated.load(Relaxed))
    }

    /// Nodes retired so far.
    pub(crate) fn retired_total(&self) -> u64 {
        self.sum(|s| s.retired.load(Relaxed))
    }

    /// Nodes freed so far.
    pub(crate) fn freed_total(&self) -> u64 {
        self.sum(|s| s.freed.load(Relaxed))
    }

    /// Live segments now. The shards are read one by one, so a track and
    /// its untrack on two threads can be seen as untrack only: a sum that
    /// wrapped below zero reads as 0.
    pub(crate) fn live_segments(&self) -> usize {
        let n = self.wrapping_sum(|s| &s.live_segments);
        if n > usize::MAX / 2 {
            0
        } else {
            n
        }
    }

    /// Bytes in live segments now.
    pub(crate) fn live_bytes(&self) -> usize {
        self.wrapping_sum(|s| &s.live_bytes)
    }

    /// The modular sum of one wrapping counter over the shards.
    fn wrapping_sum(&self, f: impl Fn(&Shard) -> &AtomicUsize) -> usize {
        self.shards
            .iter()
            .fold(0usize, |acc, s| acc.wrapping_add(f(s).load(Relaxed)))
    }
}
