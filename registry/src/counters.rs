//! The registry's statistics: live segments and bytes, and the node counts
//! that tests and the soak read.
//!
//! They are statistics, outside the protocol: plain `std` atomics, even
//! under loom, ordering no decision of the protocol. The counters every
//! track and untrack bumps are sharded by thread, each shard on its own
//! cache line, so that threads churning at once do not all write one line;
//! readers add the shards up (weakly consistent, exact once the registry is
//! quiescent, and never below zero: see `Counters::live`).

use crate::sync::uninstrumented::{
    AtomicU64, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};

/// Shards of the hot counters (a power of two).
const SHARDS: usize = 16;

/// One thread's share of the hot counters, alone on its cache line (two
/// lines: adjacent-line prefetch pairs them on x86).
///
/// Live segments and bytes are kept as two counts that only grow (modulo
/// 2^64): what was tracked and what was untracked through this shard. A
/// thread may untrack what another tracked, so a single "live" count per
/// shard would go below zero on one shard and be made up on another, and a
/// reader adding the shards up one by one could catch the untrack without
/// its track (DESIGN.md, "Counters").
#[derive(Default)]
#[repr(align(128))]
struct Shard {
    allocated: AtomicU64,
    retired: AtomicU64,
    freed: AtomicU64,
    segments: Flow,
    bytes: Flow,
}

/// What came in and what went out through one shard, each modulo 2^64.
#[derive(Default)]
struct Flow {
    tracked: AtomicUsize,
    untracked: AtomicUsize,
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
    unswept: AtomicUsize,
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

    /// A node became sweepable (an untrack, or the release of its last
    /// hold or pin); the count after this one.
    #[inline]
    pub(crate) fn became_sweepable(&self) -> usize {
        self.unswept.fetch_add(1, Relaxed) + 1
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
    #[inline]
    pub(crate) fn tracked(&self, len: usize) {
        let s = self.mine();
        // Relaxed: the untrack that follows this track is ordered after it
        // through the node's state word; the reader relies on that (see
        // `live`).
        s.segments.tracked.fetch_add(1, Relaxed);
        s.bytes.tracked.fetch_add(len, Relaxed);
    }

    /// A segment of `len` bytes was untracked.
    #[inline]
    pub(crate) fn untracked(&self, len: usize) {
        let s = self.mine();
        // Release: a reader that acquires this count also sees the track's
        // own count (see `live`).
        s.segments.untracked.fetch_add(1, Release);
        s.bytes.untracked.fetch_add(len, Release);
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

    /// Live segments now (weakly consistent, never below zero).
    pub(crate) fn live_segments(&self) -> usize {
        self.live(|s| &s.segments, &mut || {})
    }

    /// Bytes in live segments now (weakly consistent, never below zero).
    pub(crate) fn live_bytes(&self) -> usize {
        self.live(|s| &s.bytes, &mut || {})
    }

    /// What was tracked minus what was untracked, counting every untrack
    /// first and every track after, and calling `before_load` before each
    /// load (tests interleave tracks and untracks there).
    ///
    /// An untrack's count follows its own track's count in happens-before
    /// (the track counts before it links the node, and the untrack's kill
    /// CAS reads the `Live` that came after the link), and the untrack
    /// counts with Release. So once an Acquire load here has seen an
    /// untrack, the later loads of the tracked counts see its track: every
    /// segment subtracted was also added, and the difference is the size of
    /// a set of segments (each live at some moment of the read), never
    /// "negative". Exact once the registry is quiescent.
    fn live(&self, flow: impl Fn(&Shard) -> &Flow, before_load: &mut dyn FnMut()) -> usize {
        let mut gone = 0usize;
        for s in &self.shards {
            before_load();
            // Acquire: pairs with the untrack's Release add (see above).
            gone = gone.wrapping_add(flow(s).untracked.load(Acquire));
        }
        let mut came = 0usize;
        for s in &self.shards {
            before_load();
            // Relaxed: ordered after the Acquire loads above.
            came = came.wrapping_add(flow(s).tracked.load(Relaxed));
        }
        came.wrapping_sub(gone)
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;

    const LEN: usize = 2 << 20;

    impl Counters {
        fn tracked_on(&self, shard: usize, len: usize) {
            let s = &self.shards[shard];
            s.segments.tracked.fetch_add(1, Relaxed);
            s.bytes.tracked.fetch_add(len, Relaxed);
        }

        fn untracked_on(&self, shard: usize, len: usize) {
            let s = &self.shards[shard];
            s.segments.untracked.fetch_add(1, Release);
            s.bytes.untracked.fetch_add(len, Release);
        }
    }

    /// A reader adds the shards up one by one while a segment is tracked on
    /// one shard and untracked on another (the allocator's free runs on
    /// another thread than its alloc): whatever load the pair lands before,
    /// the sum is the bytes live at some moment of the read, 0 or `LEN`,
    /// never a wrapped "negative" figure.
    #[test]
    fn live_bytes_never_reads_below_zero_while_a_track_and_its_untrack_race_the_read() {
        let cases = [(0, 1), (1, 0), (3, SHARDS - 1)];
        for ((track_on, untrack_on), base) in cases.into_iter().zip([0, 7 * LEN, 0]) {
            for at in 0..=2 * SHARDS {
                let c = Counters::default();
                if base > 0 {
                    c.tracked_on(5, base); // an unrelated live segment
                }
                let mut loads = 0;
                let seen = c.live(|s| &s.bytes, &mut || {
                    if loads == at {
                        c.tracked_on(track_on, LEN);
                        c.untracked_on(untrack_on, LEN);
                    }
                    loads += 1;
                });
                assert!(
                    seen == base || seen == base + LEN,
                    "track on shard {track_on}, untrack on {untrack_on} before load {at}: \
                     read {seen} bytes"
                );
                assert_eq!(c.live_bytes(), base, "exact once quiescent");
            }
        }
    }
}
