//! What the registry's operations hand back: untracked segments and their
//! holds, hand-backs, pass reports and failures, window references and
//! statistics.

use std::mem::ManuallyDrop;

use crate::counters::Counters;
use crate::error::PassError;
use crate::node::Node;
use crate::{CommId, Segment};

/// What [`Registry::untrack`] hands back.
#[derive(Debug)]
#[must_use = "the windows must be deregistered before the memory is freed"]
pub struct Untracked<'r, W> {
    /// The segment, as it was tracked.
    pub segment: Segment,
    /// Every window still registered for it, per comm: deregister them
    /// before freeing the memory.
    pub windows: Vec<(CommId, W)>,
    /// `Some` if a registration pass (or a `forget`) still held the segment
    /// when it was untracked: a pass registers it anyway (its set was fixed
    /// when it began) and hands the window back itself. Deregister
    /// `windows`, then [`Hold::release`]: free the memory only if it returns
    /// `true`; otherwise whoever releases the last hold frees it (a pass
    /// lists it in [`PassReport::free_now`], a hand-back's `release` returns
    /// `true`).
    pub pass_hold: Option<Hold<'r, W>>,
}

/// A claim on an untracked segment's memory: while any hold exists the
/// memory must not be freed. The party that releases the last hold frees it.
#[must_use = "release the hold to learn whether to free the memory"]
pub struct Hold<'r, W> {
    pub(crate) node: *const Node<W>,
    counters: &'r Counters,
}

// SAFETY: a hold only touches the node's atomic state word.
unsafe impl<W: Send> Send for Hold<'_, W> {}
// SAFETY: as above.
unsafe impl<W: Send> Sync for Hold<'_, W> {}

impl<'r, W> Hold<'r, W> {
    pub(crate) fn new(node: *const Node<W>, counters: &'r Counters) -> Self {
        Hold { node, counters }
    }

    /// Drops the hold. `true` if it was the last hold on an untracked
    /// segment: the caller must now free the memory.
    pub fn release(self) -> bool {
        let me = ManuallyDrop::new(self);
        release_hold(me.node, me.counters)
    }
}

impl<W> Drop for Hold<'_, W> {
    fn drop(&mut self) {
        // Dropped unreleased: the "free now" answer is lost (see
        // `#[must_use]`); the hold itself is not.
        release_hold(self.node, self.counters);
    }
}

impl<W> std::fmt::Debug for Hold<'_, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hold")
    }
}

/// Releases one hold (a pass's, an untrack caller's or a hand-back's);
/// `true` if it was the last one on an untracked segment, whose memory the
/// caller must now free. The caller must not touch the node afterwards (it
/// may be swept and freed). The hold count decides who frees the memory:
/// every party deregisters its windows before it releases.
pub(crate) fn release_hold<W>(node: *const Node<W>, counters: &Counters) -> bool {
    // SAFETY: a node with a hold is never unlinked, so never freed.
    let released = unsafe { &*node }.release_hold();
    if released.sweepable {
        counters.became_sweepable();
    }
    released.last_on_dead
}

/// A window that a pass hands back instead of recording it.
#[derive(Debug)]
#[must_use = "the window must be deregistered, then the hold released"]
pub struct HandBack<'r, W> {
    /// The segment it was registered for.
    pub segment: Segment,
    /// The comm it belongs to.
    pub comm: CommId,
    /// The window.
    pub window: W,
    /// Keeps the segment's memory alive until the window is deregistered;
    /// release it afterwards, and free the memory if that returns `true`.
    pub hold: Hold<'r, W>,
}

/// What [`Registry::forget`] hands back.
#[derive(Debug)]
#[must_use = "the windows must be deregistered, then their holds released"]
pub struct Forgotten<'r, W> {
    /// The comm's windows, one per segment, each with a hold.
    pub windows: Vec<HandBack<'r, W>>,
    /// Untracked segments whose last hold `forget` released (a race with
    /// their untrack): free them.
    pub free_now: Vec<Segment>,
    /// A pass for the comm was inside a callback when it was forgotten: it
    /// stops after that callback and hands its window back in its own
    /// report (or, if the callback panics, through
    /// [`Registry::take_orphans`]). Do not destroy the comm before that pass
    /// has returned.
    pub pass_running: bool,
}

/// A window found by [`Registry::window_of`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowRef<W> {
    /// The window registered with the comm.
    pub window: W,
    /// Offset of the queried pointer from the segment's start (the window's
    /// start).
    pub offset: usize,
    /// The segment that contains the range.
    pub segment: Segment,
}

/// What a registration pass did.
#[derive(Debug)]
#[must_use = "hand-backs and free_now must be acted on"]
pub struct PassReport<'r, W> {
    /// The comm the pass ran for.
    pub comm: CommId,
    /// The segments registered, in seq order (the order of the callbacks).
    pub registered: Vec<Segment>,
    /// Windows the pass hands back instead of recording them: their
    /// segment was untracked, or the comm forgotten, while it ran.
    pub handed_back: Vec<HandBack<'r, W>>,
    /// Untracked segments whose last hold this pass released: free them.
    pub free_now: Vec<Segment>,
}

impl<W> PassReport<'_, W> {
    pub(crate) fn new(comm: CommId) -> Self {
        PassReport {
            comm,
            registered: Vec::new(),
            handed_back: Vec::new(),
            free_now: Vec::new(),
        }
    }
}

/// A pass that stopped early: the error, and the report of what it did
/// before (which must still be acted on).
#[must_use]
pub struct PassFailure<'r, W, E> {
    /// Why it stopped.
    pub error: PassError<E>,
    /// What it did before stopping.
    pub report: PassReport<'r, W>,
}

impl<W, E: std::fmt::Debug> std::fmt::Debug for PassFailure<'_, W, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassFailure")
            .field("error", &self.error)
            .field("registered", &self.report.registered)
            .finish_non_exhaustive()
    }
}

impl<W, E: std::fmt::Debug + std::fmt::Display + 'static> std::fmt::Display
    for PassFailure<'_, W, E>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.error, f)
    }
}

impl<W, E: std::error::Error + 'static> std::error::Error for PassFailure<'_, W, E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// The outcome of one registration pass.
pub type PassResult<'r, W, E> = Result<PassReport<'r, W>, PassFailure<'r, W, E>>;

/// Per-comm figures in [`Stats`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommStats {
    /// The comm.
    pub comm: CommId,
    /// Windows recorded for live segments and not handed back yet.
    pub windows: usize,
    /// Live segments its next pass would register.
    pub pending: usize,
}

/// Internal node counts, for tests and the soak.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeCounts {
    /// Nodes allocated since the registry was made (including rejected
    /// tracks).
    pub allocated: u64,
    /// Nodes handed to the reclaimer.
    pub retired: u64,
    /// Nodes actually freed by the reclaimer.
    pub freed: u64,
    /// Nodes linked in the log now, sentinel excluded (live and dead).
    pub in_log: usize,
    /// Untracked nodes still linked in the log.
    pub dead_in_log: usize,
    /// Sweeps run so far.
    pub sweeps: u64,
    /// Log nodes visited by passes so far (their cost in steps).
    pub pass_steps: u64,
}

/// A snapshot of the registry's figures (weakly consistent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Live segments.
    pub live_segments: usize,
    /// Bytes in live segments.
    pub live_bytes: usize,
    /// Per attached comm, in attach order.
    pub comms: Vec<CommStats>,
    /// Internal node counts.
    pub nodes: NodeCounts,
}
