//! A comm's state word: whether a pass runs for it (`BUSY`) and whether it
//! was forgotten (`FORGOTTEN`, final).
//!
//! The word is shared (an `Arc`) by the comm's slot and by every window
//! record registered with the comm, so that a window lookup can refuse a
//! forgotten comm's records without reading the comm table (DESIGN.md,
//! "window lookup").

use crate::sync::{AtomicU64, Ordering};

/// Set while a pass runs for the comm.
pub(crate) const BUSY: u64 = 1;
/// Set once the comm is forgotten (never cleared).
pub(crate) const FORGOTTEN: u64 = 2;

/// See the module documentation.
pub(crate) struct CommState(AtomicU64);

impl CommState {
    /// Attached, no pass running.
    #[inline]
    pub(crate) fn new() -> Self {
        CommState(AtomicU64::new(0))
    }

    /// A pass takes the comm: `Ok` if it was idle and attached, else the
    /// word as it was.
    #[inline]
    pub(crate) fn try_begin_pass(&self) -> Result<(), u64> {
        // Acquire: see the cursor the previous pass left. Relaxed on
        // failure: the caller only reports the bits.
        self.0
            .compare_exchange(0, BUSY, Ordering::Acquire, Ordering::Relaxed)
            .map(drop)
    }

    /// The pass that found nothing to do gives the comm back (it changed
    /// nothing, and `forget` cannot have run meanwhile: P0 holds the comm
    /// table's read lock).
    #[inline]
    pub(crate) fn end_idle_pass(&self) {
        // Release: hands the (unchanged) slot to the next pass.
        self.0.fetch_and(!BUSY, Ordering::Release);
    }

    /// The pass gives the comm back; the word as it was.
    #[inline]
    pub(crate) fn end_pass(&self) -> u64 {
        // AcqRel: Release publishes the cursor to the next pass; Acquire
        // sees what `forget` did before setting FORGOTTEN.
        self.0.fetch_and(!BUSY, Ordering::AcqRel)
    }

    /// `forget` marks the comm; the word as it was.
    #[inline]
    pub(crate) fn forget(&self) -> u64 {
        // SeqCst: one side of the Dekker pair with a pass's record add.
        self.0.fetch_or(FORGOTTEN, Ordering::SeqCst)
    }

    /// Whether the comm was forgotten.
    #[inline]
    pub(crate) fn is_forgotten(&self) -> bool {
        // SeqCst: the other side of forget's fetch_or (a pass after its
        // record add and fence; a lookup after reading the record).
        self.0.load(Ordering::SeqCst) & FORGOTTEN != 0
    }
}
