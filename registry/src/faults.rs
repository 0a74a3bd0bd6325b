//! Deliberately broken variants of the protocol, used as negative controls.
//!
//! With the `test-support` feature, [`Faults`] is public and
//! [`Registry::with_faults`](crate::Registry::with_faults) builds a registry
//! that takes one of the broken paths *at run time*, so that correct and
//! broken registries run side by side in one test binary. Without the
//! feature every switch is a constant `false` and the broken paths compile
//! away.

/// Which deliberately broken variants a registry runs.
#[cfg(feature = "test-support")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// The naive cursor: `seq` comes from a counter bumped when `track`
    /// starts, and a pass skips every segment whose seq is at or below the
    /// highest seq it has seen. A segment whose track was still in flight
    /// when a later one was registered is missed for good.
    pub naive_cursor: bool,
    /// A pass adds its window record without checking whether untrack has
    /// closed the segment's list: the window is lost.
    pub unchecked_window_add: bool,
    /// The overlap scan runs without its `fence(SeqCst)` after the insert:
    /// two racing overlapping tracks can both succeed.
    pub skip_overlap_fence: bool,
    /// The sweeper frees unlinked nodes at once instead of deferring them to
    /// the reclaimer: a concurrent reader touches freed memory.
    pub free_without_defer: bool,
    /// `window_of` answers from the records without reading the node's
    /// state again afterwards: a record that a pass pushed after the
    /// segment was untracked (and before untrack closed the list) can be
    /// returned, although the segment was never live while the window was
    /// recorded.
    pub skip_lookup_live_recheck: bool,
    /// `window_of` answers from a record of a forgotten comm whose window
    /// nobody has claimed back yet (a pass still inside its callback when
    /// `forget` returned pushes such a record): a lookup made after
    /// `forget` returned finds a window of a comm the caller may destroy.
    pub lookup_ignores_forget: bool,
    /// `track` publishes the segment in the page map only after making it
    /// live: a lookup in between finds the granule empty and misses a
    /// segment that a pass may already have registered.
    pub late_page_publish: bool,
    /// `untrack` leaves the segment in the page map: its slots go on naming
    /// the node after it is freed.
    pub skip_page_withdraw: bool,
    /// A publish that covers a granule whole overwrites whatever the slot
    /// holds (a count of dead sharers included) instead of adding itself: a
    /// late withdrawal of a sharer then empties the slot of a live segment.
    pub page_overwrite: bool,
    /// A checked pass computes its digest from a second walk of the log
    /// instead of from the set it holds: a racing untrack or track makes
    /// the digest describe another set than the one the pass registers.
    pub digest_from_second_walk: bool,
}

#[cfg(feature = "test-support")]
impl Faults {
    /// No fault: the shipped protocol.
    pub const NONE: Faults = Faults {
        naive_cursor: false,
        unchecked_window_add: false,
        skip_overlap_fence: false,
        free_without_defer: false,
        skip_lookup_live_recheck: false,
        lookup_ignores_forget: false,
        late_page_publish: false,
        skip_page_withdraw: false,
        page_overwrite: false,
        digest_from_second_walk: false,
    };
}

/// The switches as the protocol reads them: constant `false` unless the
/// `test-support` feature is on.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Switches(#[cfg(feature = "test-support")] Faults);

impl Switches {
    #[cfg(feature = "test-support")]
    pub(crate) fn new(f: Faults) -> Self {
        Switches(f)
    }

    #[inline(always)]
    pub(crate) fn naive_cursor(&self) -> bool {
        #[cfg(feature = "test-support")]
        return self.0.naive_cursor;
        #[cfg(not(feature = "test-support"))]
        false
    }

    #[inline(always)]
    pub(crate) fn unchecked_window_add(&self) -> bool {
        #[cfg(feature = "test-support")]
        return self.0.unchecked_window_add;
        #[cfg(not(feature = "test-support"))]
        false
    }

    #[inline(always)]
    pub(crate) fn skip_overlap_fence(&self) -> bool {
        #[cfg(feature = "test-support")]
        return self.0.skip_overlap_fence;
        #[cfg(not(feature = "test-support"))]
        false
    }

    #[inline(always)]
    pub(crate) fn skip_lookup_live_recheck(&self) -> bool {
        #[cfg(feature = "test-support")]
        return self.0.skip_lookup_live_recheck;
        #[cfg(not(feature = "test-support"))]
        false
    }

    #[inline(always)]
    pub(crate) fn lookup_ignores_forget(&self) -> bool {
        #[cfg(feature = "test-support")]
        return self.0.lookup_ignores_forget;
        #[cfg(not(feature = "test-support"))]
        false
    }

    #[inline(always)]
    pub(crate) fn late_page_publish(&self) -> bool {
        #[cfg(feature = "test-support")]
        return self.0.late_page_publish;
        #[cfg(not(feature = "test-support"))]
        false
    }

    #[inline(always)]
    pub(crate) fn skip_page_withdraw(&self) -> bool {
        #[cfg(feature = "test-support")]
        return self.0.skip_page_withdraw;
        #[cfg(not(feature = "test-support"))]
        false
    }

    #[inline(always)]
    pub(crate) fn page_overwrite(&self) -> bool {
        #[cfg(feature = "test-support")]
        return self.0.page_overwrite;
        #[cfg(not(feature = "test-support"))]
        false
    }

    #[inline(always)]
    pub(crate) fn digest_from_second_walk(&self) -> bool {
        #[cfg(feature = "test-support")]
        return self.0.digest_from_second_walk;
        #[cfg(not(feature = "test-support"))]
        false
    }

    #[inline(always)]
    pub(crate) fn free_without_defer(&self) -> bool {
        #[cfg(feature = "test-support")]
        return self.0.free_without_defer;
        #[cfg(not(feature = "test-support"))]
        false
    }
}

/// The naive negative control's seq counter (a registry's) or highest seq
/// seen (a comm's). Present only with the `test-support` feature: the
/// shipped registry carries no field for it.
#[derive(Default)]
pub(crate) struct NaiveSeq(#[cfg(feature = "test-support")] crate::sync::AtomicU64);

impl NaiveSeq {
    /// The registry's counter: the next seq, taken when a track starts.
    pub(crate) fn next(&self) -> u64 {
        #[cfg(feature = "test-support")]
        // Relaxed: the naive counter orders nothing (that is the bug).
        return self.0.fetch_add(1, crate::sync::Ordering::Relaxed) + 1;
        #[cfg(not(feature = "test-support"))]
        0
    }

    /// A comm's highest seq seen.
    pub(crate) fn highest(&self) -> u64 {
        #[cfg(feature = "test-support")]
        // Relaxed: only the comm's BUSY owner touches it.
        return self.0.load(crate::sync::Ordering::Relaxed);
        #[cfg(not(feature = "test-support"))]
        0
    }

    /// A comm's pass registered `seq`.
    pub(crate) fn saw(&self, seq: u64) {
        #[cfg(feature = "test-support")]
        {
            // Relaxed: only the comm's BUSY owner touches it.
            let m = self.0.load(crate::sync::Ordering::Relaxed).max(seq);
            self.0.store(m, crate::sync::Ordering::Relaxed);
        }
        #[cfg(not(feature = "test-support"))]
        let _ = seq;
    }
}
