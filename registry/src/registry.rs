//! The registry: track, untrack, lookup, comms and registration passes.
//!
//! The protocol is written out in DESIGN.md; the comments here name the
//! step they implement.

use std::collections::BTreeMap;
use std::mem::ManuallyDrop;
use std::ptr;
use std::sync::atomic::Ordering as StatOrdering;

use crate::comm_state::{CommState, BUSY, FORGOTTEN};
use crate::counters::Counters;
use crate::error::{CommError, PassError, TrackError, UntrackError, WindowLookupError};
use crate::faults::Switches;
use crate::index::{AddressIndex, NodeRef, SkipIndex};
use crate::node::{untag, Node, Registration, MARK};
use crate::pagemap::{PageMap, Probe, DEFAULT_PAGE_GRANULE};
use crate::state::{Phase, State, HOLD_ONE, IN_INDEX, PIN_ONE, UNLINKED, WITHDRAWN};
use crate::sync::{fence, Arc, AtomicPtr, AtomicU64, Guard, Ordering, Reclaimer, RwLock};
use crate::{CommId, Segment};

mod pass;
use pass::PassRun;

/// Dead nodes the log may carry beyond half the live count before an
/// untrack sweeps it (DESIGN.md, "Bounded memory").
pub const SWEEP_SLACK: usize = 64;

/// One attached comm.
struct CommSlot<C, W> {
    id: CommId,
    payload: C,
    /// `BUSY` while a pass runs; `FORGOTTEN` once forgotten (final). Shared
    /// with the comm's window records.
    state: Arc<CommState>,
    /// The watermark: the last log node this comm's passes have processed.
    /// Pinned (state word) so the sweeper keeps it linked. Written only by
    /// the pass that holds `BUSY` (or by `forget` when none does).
    cursor: AtomicPtr<Node<W>>,
    /// The naive negative control's "highest seq seen".
    naive_max_seq: AtomicU64,
    /// What a pass whose callback panicked could not report: handed to the
    /// next pass on this comm, or to `forget`. A std mutex, touched only on
    /// that path, by the BUSY owner or by forget.
    orphans: std::sync::Mutex<Orphans<W>>,
    /// Set after parking orphans, cleared by whoever takes them (a std
    /// atomic like the mutex: only the BUSY owner or forget touch it).
    has_orphans: std::sync::atomic::AtomicBool,
}

/// Hand-backs and frees of a pass that unwound (see `CommSlot::orphans`).
struct Orphans<W> {
    handed_back: Vec<(Segment, W, *const Node<W>)>,
    free_now: Vec<Segment>,
}

/// Orphans of forgotten comms (see `Registry::take_orphans`).
struct RegistryOrphans<W> {
    handed_back: Vec<(CommId, Segment, W, *const Node<W>)>,
    free_now: Vec<Segment>,
}

/// Locks a std mutex that only guards plain data: a panic while it was
/// held cannot leave that data half-written.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<C, W> CommSlot<C, W> {
    /// Takes the orphans as hand-backs (each keeps the hold it had).
    fn take_orphans<'r>(&self, counters: &'r Counters) -> (Vec<HandBack<'r, W>>, Vec<Segment>) {
        // Acquire: pairs with the Release store made after parking. The
        // common case (nothing parked) takes no lock.
        if !self
            .has_orphans
            .swap(false, std::sync::atomic::Ordering::Acquire)
        {
            return (Vec::new(), Vec::new());
        }
        let mut o = lock(&self.orphans);
        let backs = o
            .handed_back
            .drain(..)
            .map(|(segment, window, node)| HandBack {
                segment,
                comm: self.id,
                window,
                hold: Hold::new(node, counters),
            })
            .collect();
        (backs, std::mem::take(&mut o.free_now))
    }
}

/// A concurrent registry of memory segments with per-comm watermarks.
///
/// `C` is the payload a comm is attached with (for NCCL, the raw
/// `ncclComm_t`); `W` is the window handle a registration returns; `I` is the
/// address index (the crossbeam skiplist unless a model swaps it).
///
/// ```
/// # #[cfg(not(feature = "loom"))] {
/// use segment_registry::Registry;
///
/// let reg: Registry<&str, u32> = Registry::new();
/// let a = reg.track(0x1000, 0x100).unwrap();
/// let comm = reg.attach("world");
///
/// // The pass registers every segment the comm has not seen, in seq order.
/// let report = reg
///     .register_pending(comm, |_payload, seg| Ok::<_, ()>(Some(seg.seq as u32)))
///     .unwrap();
/// assert_eq!(report.registered, vec![a]);
///
/// // Untrack hands back the windows to deregister before freeing.
/// let gone = reg.untrack(0x1000).unwrap();
/// assert_eq!(gone.windows, vec![(comm, a.seq as u32)]);
/// assert!(gone.pass_hold.is_none()); // no pass holds it: free it now
/// # }
/// ```
pub struct Registry<C, W, I: AddressIndex = SkipIndex> {
    index: I,
    /// Containing-address lookups in O(1) (DESIGN.md, "Page map").
    pages: PageMap,
    /// The log's sentinel head (seq 0, live forever, never in the index).
    head: *mut Node<W>,
    /// The log's tail hint: the last node or the one before it.
    tail: AtomicPtr<Node<W>>,
    comms: RwLock<BTreeMap<CommId, Arc<CommSlot<C, W>>>>,
    next_comm: AtomicU64,
    naive_seq: AtomicU64,
    sweep_slack: usize,
    /// What panicking passes of forgotten comms could not report; see
    /// [`Registry::take_orphans`].
    orphans: std::sync::Mutex<RegistryOrphans<W>>,
    counters: std::sync::Arc<Counters>,
    reclaimer: Reclaimer,
    faults: Switches,
}

// SAFETY: the raw pointers are to nodes the registry owns and shares only
// through its protocol; payloads are shared (`C: Sync`) and sent (`C: Send`),
// windows are moved between threads (`W: Send`).
unsafe impl<C: Send + Sync, W: Send, I: AddressIndex> Send for Registry<C, W, I> {}
// SAFETY: as above.
unsafe impl<C: Send + Sync, W: Send, I: AddressIndex> Sync for Registry<C, W, I> {}

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
    node: *const Node<W>,
    counters: &'r Counters,
}

// SAFETY: a hold only touches the node's atomic state word.
unsafe impl<W: Send> Send for Hold<'_, W> {}
// SAFETY: as above.
unsafe impl<W: Send> Sync for Hold<'_, W> {}

impl<'r, W> Hold<'r, W> {
    fn new(node: *const Node<W>, counters: &'r Counters) -> Self {
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

/// Releases one hold; `true` if it was the last one on a dead node. The
/// caller must not touch the node afterwards (it may be swept and freed).
fn release_hold<W>(node: *const Node<W>, counters: &Counters) -> bool {
    // SAFETY: a node with a hold is never unlinked, so never freed.
    let node = unsafe { &*node };
    // SeqCst: the hold count decides who frees the memory; every party's
    // deregistrations happen before its release.
    let prev = State(node.get().state.fetch_sub(HOLD_ONE, Ordering::SeqCst));
    debug_assert!(prev.holds() > 0);
    let last = prev.holds() == 1 && prev.phase() == Phase::Dead;
    if last && prev.pins() == 0 {
        // The node just became sweepable: count it for the next sweep.
        counters.unswept.fetch_add(1, StatOrdering::Relaxed);
    }
    last
}

/// What untrack's steps U1-U2 leave for the rest of it.
struct Killed<'a, W> {
    node: &'a Node<W>,
    /// A pass held the segment at U1 (the caller got a hold too).
    held: bool,
    windows: Vec<(CommId, W)>,
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
    fn new(comm: CommId) -> Self {
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

impl<C, W> Registry<C, W, SkipIndex> {
    /// An empty registry on the crossbeam skiplist.
    pub fn new() -> Self {
        Self::with_index()
    }
}

impl<C, W> Default for Registry<C, W, SkipIndex> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C, W, I: AddressIndex> Registry<C, W, I> {
    /// An empty registry on the index `I`.
    pub fn with_index() -> Self {
        Self::build(Switches::default())
    }

    /// A registry that runs the deliberately broken variants in `faults`
    /// (negative controls for the test suites).
    #[cfg(feature = "test-support")]
    pub fn with_faults(faults: crate::Faults) -> Self {
        Self::build(Switches::new(faults))
    }

    /// Sets how many dead nodes the log may carry beyond half the live
    /// count before an untrack sweeps it (default [`SWEEP_SLACK`]). Smaller
    /// means tighter memory and more frequent sweeps; the models use 0.
    pub fn with_sweep_slack(mut self, slack: usize) -> Self {
        self.sweep_slack = slack;
        self
    }

    /// Sets the granule of the page map that answers containing-address
    /// lookups ([`find`](Self::find), [`window_of`](Self::window_of)) in
    /// O(1): [`DEFAULT_PAGE_GRANULE`] (2 MiB, `ncclMemAlloc`'s granularity)
    /// unless set. Rounded up to a power of two; `0` turns the map off, and
    /// every lookup then searches the skiplist.
    ///
    /// Lookups in a granule that one segment has to itself are one radix
    /// walk; a granule shared by several segments (segments not aligned to
    /// the granule) falls back to the skiplist. Each track and untrack
    /// writes one slot per granule its segment overlaps, and the map takes
    /// 4 KiB per 512 granules that ever held a segment.
    ///
    /// ```
    /// # #[cfg(not(feature = "loom"))] {
    /// use segment_registry::Registry;
    ///
    /// // Segments of a 64 KiB-granule allocator.
    /// let reg: Registry<(), u64> = Registry::new().with_page_granule(64 << 10);
    /// let seg = reg.track(0x7f00_0001_0000, 0x3_0000).unwrap();
    /// assert_eq!(reg.find(0x7f00_0002_1234), Some(seg));
    /// # }
    /// ```
    pub fn with_page_granule(mut self, granule: usize) -> Self {
        self.pages = PageMap::new(granule);
        // Publish what is tracked already (we own the registry: no race).
        let _guard = self.reclaimer.pin();
        let pages = &self.pages;
        self.index.for_each(&mut |_, oref| {
            let p = oref.as_ptr::<Node<W>>();
            // SAFETY: protected by the guard.
            let o = unsafe { &*p };
            if o.load_state().is_committed() {
                pages.publish(o.addr, o.end(), p as usize, false);
            }
            true
        });
        self
    }

    /// The page map's granule in bytes (0: off); see
    /// [`with_page_granule`](Self::with_page_granule).
    pub fn page_granule(&self) -> usize {
        self.pages.granule()
    }

    fn build(faults: Switches) -> Self {
        let head = Box::into_raw(Box::new(Node::new(0, 0, State::sentinel())));
        Registry {
            index: I::new(),
            pages: PageMap::new(DEFAULT_PAGE_GRANULE),
            head,
            tail: AtomicPtr::new(head),
            comms: RwLock::new(BTreeMap::new()),
            next_comm: AtomicU64::new(0),
            naive_seq: AtomicU64::new(0),
            sweep_slack: SWEEP_SLACK,
            orphans: std::sync::Mutex::new(RegistryOrphans {
                handed_back: Vec::new(),
                free_now: Vec::new(),
            }),
            counters: std::sync::Arc::new(Counters::default()),
            reclaimer: Default::default(),
            faults,
        }
    }

    // ----------------------------------------------------------------------
    // track
    // ----------------------------------------------------------------------

    /// Tracks the segment `[addr, addr + len)` and gives it the next `seq`.
    ///
    /// Lock-free; O(log n). Fails without changing anything on a zero
    /// length, an address overflow, or an overlap with a tracked segment
    /// (including one whose track races this one).
    pub fn track(&self, addr: usize, len: usize) -> Result<Segment, TrackError> {
        if len == 0 {
            return Err(TrackError::ZeroLength { addr });
        }
        let end = addr
            .checked_add(len)
            .ok_or(TrackError::Overflow { addr, len })?;
        let guard = self.reclaimer.pin();
        let node = Box::into_raw(Box::new(Node::<W>::new(addr, len, State::new_pending())));
        self.counters.allocated();
        // SAFETY: just allocated; freed only through the protocol below.
        let me = unsafe { &*node };
        if self.faults.naive_cursor() {
            // Negative control: seq taken before the segment is visible.
            // Relaxed: the naive counter orders nothing (that is the bug).
            me.set_seq(self.naive_seq.fetch_add(1, Ordering::Relaxed) + 1);
        }
        let me_ref = NodeRef::from_ptr(node);

        // Step T1: insert as Pending.
        loop {
            match self.index.insert(addr, me_ref) {
                Ok(()) => break,
                Err(other) => {
                    // SAFETY: nodes reached through the index are protected
                    // by the guard (DESIGN.md, "Who frees what").
                    let o = unsafe { &*other.as_ptr::<Node<W>>() };
                    match o.load_state().phase() {
                        Phase::Dead | Phase::Rejected => {
                            // A stale entry on its way out: help remove it.
                            if self.index.remove(addr, other) {
                                self.after_index_removal(o, &guard);
                            }
                        }
                        _ => {
                            // SAFETY: `node` was never shared.
                            drop(unsafe { Box::from_raw(node) });
                            self.counters.freed();
                            self.counters.retired();
                            return Err(TrackError::Overlap {
                                addr,
                                len,
                                other_addr: o.addr,
                                other_len: o.len,
                            });
                        }
                    }
                }
            }
        }

        // Step T2: the fence that makes two racing overlapping tracks see
        // each other (store-buffer pattern, DESIGN.md "Overlap").
        if !self.faults.skip_overlap_fence() {
            fence(Ordering::SeqCst);
        }

        // Step T3: scan and settle every overlapping pair.
        let verdict = self.settle_overlaps(me, end);

        // Step T4: commit Pending -> Accepted, unless a winner rejected us.
        let verdict = verdict.and_then(|()| {
            me.update_state(|st| {
                (st.phase() == Phase::Pending).then(|| st.with_phase(Phase::Accepted))
            })
            .map(drop)
            .map_err(|_| me.beaten_by())
        });
        if let Err((other_addr, other_len)) = verdict {
            self.reject(me, me_ref, &guard);
            return Err(TrackError::Overlap {
                addr,
                len,
                other_addr,
                other_len,
            });
        }

        // Step T4a: publish in the page map, before anyone (a pass, once
        // the node is in the log) can make it live.
        let late = self.faults.late_page_publish();
        if !late {
            self.publish_pages(me);
        }

        self.counters.tracked(len);

        // Step T5: append to the log; the link CAS fixes the seq.
        self.append(node);

        // Step T6: Accepted -> Live (a pass may already have helped).
        make_live(me);
        if late {
            self.publish_pages(me);
        }
        Ok(me.segment())
    }

    /// Step T4a: publishes a committed node in the page map.
    fn publish_pages(&self, me: &Node<W>) {
        self.pages.publish(
            me.addr,
            me.end(),
            me as *const Node<W> as usize,
            self.faults.page_overwrite(),
        );
    }

    /// Walks every index entry that may overlap `me` and settles each pair.
    fn settle_overlaps(&self, me: &Node<W>, end: usize) -> Result<(), (usize, usize)> {
        // Backward: predecessors whose range may reach into ours. A
        // committed predecessor ends the walk: committed segments never
        // overlap each other, so none further left can reach past it...
        // except through a pending one, which is why pending and dead ones
        // do not end it.
        let mut key = me.addr;
        while let Some((k, oref)) = self.index.below(key) {
            // SAFETY: protected by the caller's guard.
            let o = unsafe { &*oref.as_ptr::<Node<W>>() };
            let st = o.load_state();
            if o.end() > me.addr {
                self.settle_pair(me, o)?;
            }
            if st.is_committed() {
                break;
            }
            key = k;
        }
        // Forward: every entry that starts inside our range overlaps us.
        let mut result = Ok(());
        self.index.for_each_between(me.addr, end, &mut |_, oref| {
            // SAFETY: protected by the caller's guard.
            let o = unsafe { &*oref.as_ptr::<Node<W>>() };
            result = self.settle_pair(me, o);
            result.is_ok()
        });
        result
    }

    /// Settles one overlapping pair by the fixed rule: a committed segment
    /// wins; between two pending ones the lower start address wins, and the
    /// winner rejects the loser with one CAS on the loser's state word.
    fn settle_pair(&self, me: &Node<W>, o: &Node<W>) -> Result<(), (usize, usize)> {
        let i_win = me.addr < o.addr;
        if i_win {
            o.set_beaten_by(me.addr, me.len);
        }
        // The only write: a winner rejects a pending loser.
        let st = match o.update_state(|st| {
            (i_win && st.phase() == Phase::Pending).then(|| st.with_phase(Phase::Rejected))
        }) {
            Ok(_) => return Ok(()),
            Err(st) => st,
        };
        match st.phase() {
            Phase::Rejected => Ok(()),
            Phase::Dead => {
                // An untrack overtook this neighbour: order the rest of the
                // scan after it (DESIGN.md §5, three-party case).
                fence(Ordering::SeqCst);
                Ok(())
            }
            // Committed, or pending with the lower start: it wins.
            Phase::Accepted | Phase::Live | Phase::Pending => Err((o.addr, o.len)),
        }
    }

    /// Backs a losing track out: Rejected, out of the index, retired.
    fn reject(&self, me: &Node<W>, me_ref: NodeRef, guard: &Guard) {
        // Already Rejected if a winner did it.
        let _ = me.update_state(|st| {
            (st.phase() == Phase::Pending).then(|| st.with_phase(Phase::Rejected))
        });
        if self.index.remove(me.addr, me_ref) {
            self.after_index_removal(me, guard);
        }
    }

    /// Called by the one thread whose index removal of `o` succeeded.
    fn after_index_removal(&self, o: &Node<W>, guard: &Guard) {
        // SeqCst: the sweeper's unlink CAS reads IN_INDEX in the same word.
        let prev = State(o.get().state.fetch_and(!IN_INDEX, Ordering::SeqCst));
        if prev.phase() == Phase::Rejected {
            // Never logged: out of the index means unreachable.
            self.retire(o, guard);
        }
    }

    /// Appends `node` to the log (Michael-Scott): the CAS that links it after
    /// the last node also fixes its seq as that node's seq + 1.
    fn append(&self, node: *mut Node<W>) {
        // SAFETY: `node` is ours until linked.
        let me = unsafe { &*node };
        loop {
            // Acquire: see the node the tail points at.
            let t = self.tail.load(Ordering::Acquire);
            // SAFETY: the tail hint is the last node or the one before it,
            // and the sweeper never unlinks those (DESIGN.md, "Log").
            let tn = unsafe { &*t };
            // Acquire: see the successor's fields.
            let next = tn.next_node();
            if !next.is_null() {
                // Help a lagging tail. Release: publish nothing new; the
                // node was published by its link. Relaxed on failure: retry.
                let _ = self
                    .tail
                    .compare_exchange(t, next, Ordering::Release, Ordering::Relaxed);
                continue;
            }
            if !self.faults.naive_cursor() {
                me.set_seq(tn.seq() + 1);
            }
            // Release: publishes seq, addr, len and state to whoever reads
            // the link. Acquire on failure: we re-read the new successor.
            if tn
                .get()
                .next
                .compare_exchange(ptr::null_mut(), node, Ordering::Release, Ordering::Acquire)
                .is_ok()
            {
                let _ = self
                    .tail
                    .compare_exchange(t, node, Ordering::Release, Ordering::Relaxed);
                return;
            }
        }
    }

    // ----------------------------------------------------------------------
    // untrack
    // ----------------------------------------------------------------------

    /// Untracks the segment that starts at `addr`.
    ///
    /// Lock-free; O(log n) plus an amortized O(1) share of log cleanup.
    /// Returns every window still registered for it, and a [`Hold`] if a
    /// registration pass still holds it (its memory must then wait).
    pub fn untrack(&self, addr: usize) -> Result<Untracked<'_, W>, UntrackError> {
        let guard = self.reclaimer.pin();
        // U1-U2 run on the entry the index found, which U3 then removes
        // without searching again.
        let mut killed: Option<Killed<'_, W>> = None;
        let removed = self
            .index
            .get_then_remove(addr, &mut |oref| {
                // SAFETY: protected by the guard.
                let o = unsafe { &*oref.as_ptr::<Node<W>>() };
                // Step U1 (linearization point): Live -> Dead, taking a hold
                // for the caller if a pass holds the segment.
                let held = match o.update_state(|st| {
                    let hold = if st.holds() > 0 { HOLD_ONE } else { 0 };
                    (st.phase() == Phase::Live).then(|| State(st.with_phase(Phase::Dead).0 + hold))
                }) {
                    Ok(old) => old.holds() > 0,
                    Err(_) => return false,
                };

                // Step U1a: out of the page map; only then may a sweep
                // retire the node (`WITHDRAWN`), so no slot ever names a
                // retired node. SeqCst: the sweeper's claim CAS reads it.
                if !self.faults.skip_page_withdraw() {
                    self.pages
                        .withdraw(o.addr, o.end(), o as *const Node<W> as usize);
                }
                o.get().state.fetch_or(WITHDRAWN, Ordering::SeqCst);

                // Step U2: close the window list and claim what is there.
                let mut windows = Vec::new();
                o.get().records.close(&mut windows);
                killed = Some(Killed {
                    node: o,
                    held,
                    windows,
                });
                // Step U3: out of the index (by the caller of this closure).
                true
            })
            .unwrap_or(false);
        let Some(Killed {
            node: o,
            held,
            windows,
        }) = killed
        else {
            return Err(UntrackError::Unknown { addr });
        };
        if removed {
            self.after_index_removal(o, &guard);
        }
        self.counters.untracked(o.len);

        // Step U4: count the dead node; sweep the log once enough died.
        let unswept = self.counters.unswept.fetch_add(1, StatOrdering::Relaxed) + 1;
        if self.counters.sweep_due(unswept, self.sweep_slack) {
            self.sweep(&guard);
        }

        Ok(Untracked {
            segment: o.segment(),
            windows,
            pass_hold: held.then(|| Hold::new(o, &self.counters)),
        })
    }

    /// Unlinks the sweepable nodes of the log, up to its end as of now.
    ///
    /// Any number of threads may sweep at once (Harris-style): a node is
    /// first claimed by setting `UNLINKED` in its state word (one CAS, which
    /// also checks it is dead, out of the index, unheld and unpinned), then
    /// its link is marked (frozen), then one CAS on its predecessor's link
    /// swings past it. Whoever wins that CAS retires it; if it fails (the
    /// predecessor was being unlinked too), a later sweep finishes the job.
    /// A sweeper that is descheduled therefore delays nobody.
    fn sweep(&self, guard: &Guard) {
        self.counters.sweep_started();
        // Up to the last node of now, not of whenever we get there: appends
        // keep moving the end, and a sweep must be bounded.
        let stop = self.last_node();
        let mut prev = self.head as *const Node<W>;
        // SAFETY: the sentinel lives as long as the registry.
        let mut cur = unsafe { &*prev }.next_node();
        while !cur.is_null() && !ptr::eq(cur, stop) {
            // SAFETY: reached through log links under the guard.
            let c = unsafe { &*cur };
            let next = c.next_node();
            // SAFETY: as above.
            if next.is_null() || unsafe { &*next }.next_node().is_null() {
                // Keep the last two nodes: the tail hint may point at
                // either, and appends CAS the last one's link.
                break;
            }
            let claimed = c.load_state().has(UNLINKED) || try_mark_unlinked(c);
            if !claimed {
                prev = cur;
                cur = next;
                continue;
            }
            // Freeze the link (the successor can no longer change), then
            // swing the predecessor past `c`. SeqCst: the mark and the swing
            // order against other sweepers' swings of the same links.
            let succ = mark_link(c);
            // SAFETY: `prev` was reached under the guard.
            let swung = unsafe { &*prev }
                .get()
                .next
                .compare_exchange(cur, succ, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok();
            if swung {
                self.retire(c, guard);
            } else {
                // `prev` is being unlinked too (its link is marked): leave
                // `c` to a later sweep, which sees it claimed and retries.
                prev = cur;
            }
            cur = succ;
        }
    }

    /// The node whose link is null now (the caller holds a guard).
    fn last_node(&self) -> *const Node<W> {
        // Acquire: see the node the hint points at.
        let mut t = self.tail.load(Ordering::Acquire);
        loop {
            // SAFETY: the tail hint and the links it leads to are linked
            // nodes, protected by the caller's guard.
            let n = unsafe { &*t }.next_node();
            if n.is_null() {
                return t;
            }
            t = n;
        }
    }

    /// Hands an unreachable node to the reclaimer.
    fn retire(&self, o: &Node<W>, guard: &Guard) {
        self.counters.retired();
        let p = o as *const Node<W> as *mut Node<W>;
        let counters = self.counters.clone();
        let free = move || {
            // SAFETY: retired exactly once, after it became unreachable;
            // made by `Box::into_raw`.
            drop(unsafe { Box::from_raw(p) });
            counters.freed();
        };
        if self.faults.free_without_defer() {
            // Negative control: free now, whoever may still be reading.
            // Under the model reclaimer the node is poisoned now instead,
            // so that the next access panics rather than reading freed
            // memory.
            #[cfg(feature = "loom")]
            // SAFETY: as below; the model reclaimer frees it only when it
            // is dropped itself.
            unsafe {
                guard.retire_now(o.poison(), free)
            };
            #[cfg(not(feature = "loom"))]
            free();
            return;
        }
        // SAFETY: the node is out of the index and out of the log (or was
        // never logged), so no thread that pins from now on can reach it.
        unsafe { guard.retire(o.poison(), free) };
    }

    // ----------------------------------------------------------------------
    // lookup and iteration
    // ----------------------------------------------------------------------

    /// The tracked segment that contains `addr`, if any. Lock-free; O(log n).
    pub fn find(&self, addr: usize) -> Option<Segment> {
        let _guard = self.reclaimer.pin();
        self.find_node(addr).map(Node::segment)
    }

    /// The window registered with `comm` for the tracked segment that
    /// contains the whole byte range `[ptr, ptr + size)`, and the offset of
    /// `ptr` in it: what NCCL's device API (`ncclGetLocalPointer(window,
    /// offset)`) needs to address a tensor.
    ///
    /// The answer is lock-free and O(log n) when there is a window; the
    /// error answers that must tell "comm not attached" apart read the comm
    /// table under its read lock. Linearizable against untrack, forget and
    /// passes: a window is returned only while it is recorded, never after
    /// untrack or forget has handed it back.
    ///
    /// ```
    /// # #[cfg(not(feature = "loom"))] {
    /// use segment_registry::{Registry, WindowLookupError};
    ///
    /// let reg: Registry<(), u64> = Registry::new();
    /// let comm = reg.attach(());
    /// let seg = reg.track(0x20_0000, 0x20_0000).unwrap();
    /// assert!(matches!(
    ///     reg.window_of(comm, 0x20_1000, 64),
    ///     Err(WindowLookupError::NotRegistered { .. })
    /// ));
    /// let _ = reg.register_pending(comm, |_, _| Ok::<_, ()>(Some(7))).unwrap();
    /// let found = reg.window_of(comm, 0x20_1000, 64).unwrap();
    /// assert_eq!((found.window, found.offset, found.segment), (7, 0x1000, seg));
    /// # }
    /// ```
    pub fn window_of(
        &self,
        comm: CommId,
        ptr: usize,
        size: usize,
    ) -> Result<WindowRef<W>, WindowLookupError>
    where
        W: Copy,
    {
        let _guard = self.reclaimer.pin();
        let found = self.find_node(ptr).map(|o| {
            let reg = o.get().records.lookup(comm, self.faults);
            // The segment must still be live after the records were read: a
            // pass may push a record after the segment died, before its
            // untrack closes the list (DESIGN.md, "window lookup").
            let live =
                self.faults.skip_lookup_live_recheck() || o.load_state().phase() == Phase::Live;
            (o.segment(), if live { reg } else { Registration::Closed })
        });
        // Only the error answers read the comm table.
        let not_attached = || !self.comms.read().unwrap().contains_key(&comm);
        let (segment, reg) = match found {
            Some(f) => f,
            None if not_attached() => return Err(WindowLookupError::NotAttached(comm)),
            None => return Err(WindowLookupError::NotTracked { ptr }),
        };
        if ptr.checked_add(size).is_none_or(|end| end > segment.end()) {
            return Err(WindowLookupError::CrossesEnd { ptr, size, segment });
        }
        match reg {
            Registration::Window(window) => Ok(WindowRef {
                window,
                offset: ptr - segment.addr,
                segment,
            }),
            // Untracked since `find_node` saw it live: linearize after that.
            Registration::Closed => Err(WindowLookupError::NotTracked { ptr }),
            Registration::Forgotten => Err(WindowLookupError::NotAttached(comm)),
            _ if not_attached() => Err(WindowLookupError::NotAttached(comm)),
            Registration::NoWindow => Err(WindowLookupError::NoWindow { comm, segment }),
            Registration::None => Err(WindowLookupError::NotRegistered { comm, segment }),
        }
    }

    /// The live node containing `addr`: from the page map when its granule
    /// says, else from the index. The caller holds a guard.
    fn find_node(&self, addr: usize) -> Option<&Node<W>> {
        match self.pages.probe(addr) {
            Probe::Empty => None,
            Probe::One(p) => {
                // SAFETY: a node read from a slot by a pinned thread is not
                // freed before the guard drops (DESIGN.md, "Page map").
                let o = unsafe { &*(p as *const Node<W>) };
                // Only live segments count; a dead or not yet live one
                // means no segment contains `addr` now (DESIGN.md, "Page map").
                (o.addr <= addr && addr < o.end() && o.load_state().phase() == Phase::Live)
                    .then_some(o)
            }
            Probe::Ask => self.find_in_index(addr),
        }
    }

    /// The live node containing `addr`, searched in the index. The caller
    /// holds a guard.
    fn find_in_index(&self, addr: usize) -> Option<&Node<W>> {
        let mut key = addr;
        loop {
            let (k, oref) = self.index.at_or_below(key)?;
            // SAFETY: protected by the caller's guard.
            let o = unsafe { &*oref.as_ptr::<Node<W>>() };
            if o.load_state().phase() == Phase::Live {
                // Live segments never overlap, so no live one further left
                // can contain `addr`.
                return (o.end() > addr).then_some(o);
            }
            // A pending, dead or rejected entry can hide a live one.
            key = k.checked_sub(1)?;
        }
    }

    /// Every tracked segment, in address order (weakly consistent).
    pub fn segments(&self) -> Vec<Segment> {
        let _guard = self.reclaimer.pin();
        let mut out = Vec::new();
        self.index.for_each(&mut |_, oref| {
            // SAFETY: protected by the guard.
            let o = unsafe { &*oref.as_ptr::<Node<W>>() };
            if o.load_state().phase() == Phase::Live {
                out.push(o.segment());
            }
            true
        });
        out
    }

    /// Every tracked segment, in seq order (weakly consistent).
    pub fn segments_by_seq(&self) -> Vec<Segment> {
        let _guard = self.reclaimer.pin();
        let mut out = Vec::new();
        self.walk_log(self.head, ptr::null(), |o| {
            if o.load_state().phase() == Phase::Live {
                out.push(o.segment());
            }
        });
        out
    }

    /// Calls `f` on each node after `from`, up to and including `to` (or to
    /// the end if `to` is null). The caller holds a guard.
    fn walk_log(&self, from: *const Node<W>, to: *const Node<W>, mut f: impl FnMut(&Node<W>)) {
        let mut cur = from;
        while cur != to {
            // SAFETY: reached through log links under the caller's guard.
            let next = unsafe { &*cur }.next_node();
            if next.is_null() {
                break;
            }
            // SAFETY: as above.
            f(unsafe { &*next });
            cur = next;
        }
    }

    // ----------------------------------------------------------------------
    // comms
    // ----------------------------------------------------------------------

    /// Attaches a comm. Its id is never reused, and ids grow in attach order.
    /// Its first pass registers every tracked segment.
    pub fn attach(&self, payload: C) -> CommId {
        // Relaxed: uniqueness only; the slot is published by the lock.
        let id = CommId(self.next_comm.fetch_add(1, Ordering::Relaxed) + 1);
        // SAFETY: the sentinel lives as long as the registry.
        let head = unsafe { &*self.head };
        // SeqCst: the pin count shares the word the sweeper CASes (the
        // sentinel is never swept anyway).
        head.get().state.fetch_add(PIN_ONE, Ordering::SeqCst);
        let slot = Arc::new(CommSlot {
            id,
            payload,
            state: Arc::new(CommState::new()),
            cursor: AtomicPtr::new(self.head),
            naive_max_seq: AtomicU64::new(0),
            orphans: std::sync::Mutex::new(Orphans {
                handed_back: Vec::new(),
                free_now: Vec::new(),
            }),
            has_orphans: std::sync::atomic::AtomicBool::new(false),
        });
        self.comms.write().unwrap().insert(id, slot);
        id
    }

    /// Attached comms, in attach order.
    pub fn comms(&self) -> Vec<CommId> {
        self.comms.read().unwrap().keys().copied().collect()
    }

    /// A copy of a comm's payload.
    pub fn payload(&self, comm: CommId) -> Option<C>
    where
        C: Clone,
    {
        self.slot(comm).map(|s| s.payload.clone())
    }

    fn slot(&self, comm: CommId) -> Option<Arc<CommSlot<C, W>>> {
        self.comms.read().unwrap().get(&comm).cloned()
    }

    /// Forgets a comm and hands back every window it still holds.
    ///
    /// Each window comes as a [`HandBack`] whose hold keeps the segment's
    /// memory from being freed (by a racing untrack) until the window is
    /// deregistered. A pass running for the comm stops after its current
    /// callback and hands back the window that callback returned.
    pub fn forget(&self, comm: CommId) -> Result<Forgotten<'_, W>, CommError> {
        let slot = self
            .comms
            .write()
            .unwrap()
            .remove(&comm)
            .ok_or(CommError::NotAttached(comm))?;
        let prev = slot.state.forget();
        if prev & BUSY == 0 {
            // No pass runs, and none can start now: take the watermark out
            // (readers find null: not attached), then drop its pin.
            let c = slot.cursor.swap(ptr::null_mut(), Ordering::AcqRel);
            unpin(c, &self.counters);
        }
        fence(Ordering::SeqCst);
        let _guard = self.reclaimer.pin();
        let (windows, free_now) = if prev & BUSY == 0 {
            slot.take_orphans(&self.counters)
        } else {
            (Vec::new(), Vec::new()) // the running pass hands them back
        };
        let mut out = Forgotten {
            windows,
            free_now,
            pass_running: prev & BUSY != 0,
        };
        let mut claimed = Vec::new();
        self.index.for_each(&mut |_, oref| {
            // SAFETY: protected by the guard.
            let o = unsafe { &*oref.as_ptr::<Node<W>>() };
            // Hold the segment before taking its window, so that an untrack
            // racing us waits for our deregistration to free the memory; a
            // segment already untracked is left to its untrack.
            if !o.get().records.has_open(comm) || !try_hold(o) {
                return true;
            }
            o.get().records.claim_comm(comm, &mut claimed);
            let seg = o.segment();
            let mut holding = true;
            for (_, window) in claimed.drain(..) {
                debug_assert!(holding, "one record per comm and segment");
                holding = false;
                out.windows.push(HandBack {
                    segment: seg,
                    comm,
                    window,
                    hold: Hold::new(o, &self.counters),
                });
            }
            if holding && release_hold(o, &self.counters) {
                out.free_now.push(seg);
            }
            true
        });
        Ok(out)
    }

    /// Live segments the next pass for `comm` would register. O(k + d),
    /// where d is the dead nodes not swept yet between watermark and tail.
    pub fn pending(&self, comm: CommId) -> Result<usize, CommError> {
        let slot = self.slot(comm).ok_or(CommError::NotAttached(comm))?;
        let _guard = self.reclaimer.pin();
        // Acquire: the cursor node stays reachable for a guard pinned before
        // this load: it is unpinned only after being swapped out.
        let cursor = slot.cursor.load(Ordering::Acquire);
        if cursor.is_null() {
            return Err(CommError::NotAttached(comm)); // forgotten meanwhile
        }
        let mut n = 0;
        self.walk_log(cursor, ptr::null(), |o| {
            if o.load_state().is_committed() {
                n += 1;
            }
        });
        Ok(n)
    }

    // ----------------------------------------------------------------------
    // registration passes
    // ----------------------------------------------------------------------

    /// Runs a registration pass for `comm`: calls `register` on every segment
    /// that was tracked, not registered with `comm`, and not untracked when
    /// the pass began, in seq order, and records each window it returns
    /// (`Ok(None)`: registered without a window).
    ///
    /// The set is fixed when the pass begins. A segment untracked while the
    /// pass holds it is still registered; its window comes back in
    /// [`PassReport::handed_back`]. On a callback error the pass stops:
    /// what came before stays registered, the error is returned, and a retry
    /// resumes at the failed segment. If the callback panics, the panic
    /// propagates and the registry stays as if the callback had failed; what
    /// the pass had to hand back is handed back by the next pass on the comm
    /// (or by `forget`).
    ///
    /// Passes on one comm are serialized: a second one gets
    /// [`CommError::Busy`] at once. No lock and no epoch guard is held
    /// across `register`. A pass with nothing pending is O(1); otherwise
    /// O(k + d) for k pending and d untracked-but-unswept nodes in between.
    pub fn register_pending<E, F>(&self, comm: CommId, register: F) -> PassResult<'_, W, E>
    where
        F: FnMut(&C, &Segment) -> Result<Option<W>, E>,
    {
        let fail = |e: CommError| PassFailure {
            error: PassError::Comm(e),
            report: PassReport::new(comm),
        };
        let comms = self.comms.read().unwrap();
        let slot = comms
            .get(&comm)
            .ok_or_else(|| fail(CommError::NotAttached(comm)))?;
        if let Err(s) = slot.state.try_begin_pass() {
            return Err(fail(if s & FORGOTTEN != 0 {
                CommError::NotAttached(comm)
            } else {
                CommError::Busy(comm)
            }));
        }
        // Step P0: nothing pending and nothing parked, decided in O(1) with
        // no epoch pin. The read lock keeps `forget` from removing the slot
        // (so FORGOTTEN cannot be set while we are BUSY here).
        // Acquire: pairs with the Release store made after parking.
        if !slot.has_orphans.load(std::sync::atomic::Ordering::Acquire) {
            // Acquire: see the cursor node the last pass published.
            let cursor = slot.cursor.load(Ordering::Acquire);
            // SAFETY: the cursor node is pinned by this comm, so never
            // unlinked or freed, and only the BUSY owner (us) moves it.
            if unsafe { &*cursor }.next_node().is_null() {
                slot.state.end_idle_pass();
                return Ok(PassReport::new(comm));
            }
        }
        // Callbacks may attach or forget comms: no lock across them.
        let slot = slot.clone();
        drop(comms);
        PassRun::start(self, &slot).run(register)
    }

    /// Runs a pass for every attached comm, in attach order, with
    /// `register(comm, payload, segment)`. A comm whose pass fails does not
    /// stop the others.
    pub fn register_pending_all<E, F>(&self, mut register: F) -> Vec<PassResult<'_, W, E>>
    where
        F: FnMut(CommId, &C, &Segment) -> Result<Option<W>, E>,
    {
        self.comms()
            .into_iter()
            .map(|id| self.register_pending(id, |c, s| register(id, c, s)))
            .collect()
    }

    /// Untracks every tracked segment, in seq order, and hands back all their
    /// windows (for shutdown; see [`Registry::untrack`] for each result).
    pub fn drain(&self) -> Vec<Untracked<'_, W>> {
        self.segments_by_seq()
            .into_iter()
            .filter_map(|s| self.untrack(s.addr).ok())
            .collect()
    }

    /// Hand-backs and frees that a pass could not report because its
    /// callback panicked after its comm had been forgotten (its `forget`
    /// said `pass_running`). Call it once that pass has unwound; each window
    /// must be deregistered, then its hold released.
    pub fn take_orphans(&self) -> Forgotten<'_, W> {
        let mut o = lock(&self.orphans);
        Forgotten {
            windows: o
                .handed_back
                .drain(..)
                .map(|(comm, segment, window, node)| HandBack {
                    segment,
                    comm,
                    window,
                    hold: Hold::new(node, &self.counters),
                })
                .collect(),
            free_now: std::mem::take(&mut o.free_now),
            pass_running: false,
        }
    }

    /// A weakly consistent snapshot of the registry's figures.
    pub fn stats(&self) -> Stats {
        let _guard = self.reclaimer.pin();
        let slots: Vec<_> = self.comms.read().unwrap().values().cloned().collect();
        let mut windows: BTreeMap<CommId, usize> = BTreeMap::new();
        self.index.for_each(&mut |_, oref| {
            // SAFETY: protected by the guard.
            let o = unsafe { &*oref.as_ptr::<Node<W>>() };
            o.get()
                .records
                .count_open(|c| *windows.entry(c).or_default() += 1);
            true
        });
        let comms = slots
            .iter()
            .map(|s| CommStats {
                comm: s.id,
                windows: windows.get(&s.id).copied().unwrap_or(0),
                pending: self.pending(s.id).unwrap_or(0),
            })
            .collect();
        let (mut in_log, mut dead_in_log) = (0, 0);
        self.walk_log(self.head, ptr::null(), |o| {
            in_log += 1;
            if o.load_state().phase() == Phase::Dead {
                dead_in_log += 1;
            }
        });
        let c = &self.counters;
        Stats {
            live_segments: c.live_segments(),
            live_bytes: c.live_bytes(),
            comms,
            nodes: NodeCounts {
                allocated: c.allocated_total(),
                retired: c.retired_total(),
                freed: c.freed_total(),
                in_log,
                dead_in_log,
                sweeps: c.sweeps.load(StatOrdering::Relaxed),
                pass_steps: c.pass_steps.load(StatOrdering::Relaxed),
            },
        }
    }

    /// Runs the reclaimer's deferred frees that are due (tests and soaks call
    /// it before reading [`NodeCounts::freed`]).
    pub fn flush(&self) {
        for _ in 0..4 {
            self.reclaimer.pin().flush();
        }
    }
}

impl<C, W, I: AddressIndex> Drop for Registry<C, W, I> {
    fn drop(&mut self) {
        // Exclusive access: every node still linked in the log is freed here
        // (retired ones belong to the reclaimer). Comm pins no longer matter.
        let mut cur = self.head;
        while !cur.is_null() {
            // SAFETY: exclusive; every linked node was made by
            // `Box::into_raw` and is in the log once.
            let node = unsafe { Box::from_raw(cur) };
            cur = untag(node.get().next.load(Ordering::Relaxed));
        }
    }
}

/// Sets the deletion mark on `o`'s (non-null) link and returns the
/// successor it froze.
fn mark_link<W>(o: &Node<W>) -> *mut Node<W> {
    // SeqCst: the mark and the swings of other sweepers order on this link.
    let mut n = o.get().next.load(Ordering::SeqCst);
    loop {
        if n as usize & MARK != 0 {
            return untag(n);
        }
        let marked = (n as usize | MARK) as *mut Node<W>;
        match o
            .get()
            .next
            .compare_exchange(n, marked, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => return n,
            Err(x) => n = x,
        }
    }
}

/// Accepted -> Live, keeping holds and pins (a pass may have done it).
fn make_live<W>(o: &Node<W>) {
    let _ =
        o.update_state(|st| (st.phase() == Phase::Accepted).then(|| st.with_phase(Phase::Live)));
}

/// Pins a node unless it is unlinked (one CAS: the sweeper's unlink and the
/// pin cannot both succeed).
fn try_pin<W>(o: &Node<W>) -> bool {
    o.update_state(|st| (!st.has(UNLINKED)).then(|| State(st.0 + PIN_ONE)))
        .is_ok()
}

fn unpin<W>(o: *const Node<W>, counters: &Counters) {
    // SAFETY: a pinned node is never unlinked, so never freed.
    let o = unsafe { &*o };
    // SeqCst: the sweeper reads the pin count in the same word.
    let prev = State(o.get().state.fetch_sub(PIN_ONE, Ordering::SeqCst));
    if prev.pins() == 1 && prev.holds() == 0 && prev.phase() == Phase::Dead {
        // The node just became sweepable: count it for the next sweep.
        counters.unswept.fetch_add(1, StatOrdering::Relaxed);
    }
}

/// Holds a node for a pass: Live (or Accepted, which the pass first helps to
/// Live) gains a hold; anything else is not in the pass's set.
fn try_hold<W>(o: &Node<W>) -> bool {
    o.update_state(|st| {
        st.is_committed()
            .then(|| State(st.with_phase(Phase::Live).0 + HOLD_ONE))
    })
    .is_ok()
}

/// Claims a node for unlinking: sets `UNLINKED` if it is sweepable.
fn try_mark_unlinked<W>(o: &Node<W>) -> bool {
    o.update_state(|st| st.is_sweepable().then_some(State(st.0 | UNLINKED)))
        .is_ok()
}
