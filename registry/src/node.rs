//! Segment nodes: their fields and every transition of their state word.
//!
//! A node is shared by the address index, the log and the passes that hold
//! it; it is freed exactly once, through the reclaimer, by the thread that
//! makes it unreachable last (DESIGN.md, "Who frees what").

use std::ptr;

use crate::records::Records;
use crate::state::{Phase, State, HOLD_ONE, IN_INDEX, PIN_ONE, UNLINKED, WITHDRAWN};
use crate::sync::{uninstrumented, AtomicPtr, AtomicU64, Ordering, PoisonFlag};
use crate::Segment;

/// A segment node.
pub(crate) struct Node<W> {
    pub(crate) addr: usize,
    pub(crate) len: usize,
    /// Set by the tracker before the log link that publishes it (or at
    /// track time in the naive negative control); read after that link.
    seq: AtomicU64,
    /// See [`State`].
    state: AtomicU64,
    /// The log link. Written from null to a node by an append (CAS); marked
    /// (frozen) once the node is claimed for unlinking; swung from a node to
    /// a later one by a sweeper's CAS (DESIGN.md, "sweep").
    pub(crate) next: AtomicPtr<Node<W>>,
    /// The windows registered for this segment, one record per comm.
    pub(crate) records: Records<W>,
    /// The winner of a lost overlap race, for the error message only.
    beaten: [uninstrumented::AtomicUsize; 2],
    poison: PoisonFlag,
}

impl<W> Node<W> {
    pub(crate) fn new(addr: usize, len: usize, state: State) -> Self {
        Node {
            addr,
            len,
            seq: AtomicU64::new(0),
            state: AtomicU64::new(state.0),
            next: AtomicPtr::new(ptr::null_mut()),
            records: Records::new(),
            beaten: Default::default(),
            poison: Default::default(),
        }
    }

    /// Checks (in loom models) that the node has not been reclaimed, and
    /// returns it; every access to a shared node goes through here.
    #[inline(always)]
    #[track_caller]
    pub(crate) fn get(&self) -> &Self {
        self.poison.check();
        self
    }

    pub(crate) fn poison(&self) -> &PoisonFlag {
        &self.poison
    }

    /// The seq, for a reader that reached the node through the log or saw
    /// it `Live`.
    pub(crate) fn seq(&self) -> u64 {
        // Relaxed: the tracker writes the seq before the Release link CAS
        // (T5). Log walkers read it after an Acquire load of that link.
        // Readers that came through the index or the page map reached the
        // node before its seq was written (T1 and T4a precede T5), so they
        // read it only after reading the state word `Live` (SeqCst), which
        // the tracker (T6) or a pass that acquired the link (P3) wrote after
        // the seq: that read, not the index's Acquire, makes the seq visible.
        self.get().seq.load(Ordering::Relaxed)
    }

    pub(crate) fn set_seq(&self, seq: u64) {
        // Relaxed: published by the Release CAS of the log link.
        self.seq.store(seq, Ordering::Relaxed);
    }

    pub(crate) fn load_state(&self) -> State {
        State(self.get().state.load(Ordering::SeqCst))
    }

    /// Records the range that rejected this node (before the rejecting CAS).
    pub(crate) fn set_beaten_by(&self, addr: usize, len: usize) {
        // Relaxed: diagnostic only, published by the rejecting CAS.
        self.get().beaten[0].store(addr, uninstrumented::Ordering::Relaxed);
        self.beaten[1].store(len, uninstrumented::Ordering::Relaxed);
    }

    /// The range that rejected this node.
    pub(crate) fn beaten_by(&self) -> (usize, usize) {
        // Relaxed: diagnostic only; read after observing the rejection.
        (
            self.get().beaten[0].load(uninstrumented::Ordering::Relaxed),
            self.beaten[1].load(uninstrumented::Ordering::Relaxed),
        )
    }

    /// The log successor, with the deletion mark stripped. Acquire: see the
    /// successor's fields, published by the link that made it reachable.
    pub(crate) fn next_node(&self) -> *mut Node<W> {
        untag(self.get().next.load(Ordering::Acquire))
    }

    /// Applies `f` to the state word by compare-and-swap until it succeeds
    /// (`Ok(old)`) or `f` declines (`Err(current)`). Every decision about
    /// the node (a phase change, a pin that must not meet an unlink, the
    /// unlink claim) goes through here; the hold and pin counts and the
    /// `IN_INDEX`/`WITHDRAWN` bits change by one RMW each, in the methods
    /// below. SeqCst: the overlap argument (DESIGN.md §5) needs these in
    /// the single total order.
    fn update_state(&self, mut f: impl FnMut(State) -> Option<State>) -> Result<State, State> {
        let mut st = self.load_state();
        loop {
            let Some(new) = f(st) else { return Err(st) };
            match self
                .state
                .compare_exchange(st.0, new.0, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Ok(st),
                Err(s) => st = State(s),
            }
        }
    }

    // ----------------------------------------------------------------------
    // Transitions of the state word. Decisions are one CAS each, through
    // `update_state`; hold and pin counts and the `IN_INDEX`/`WITHDRAWN`
    // bits change by one RMW each. All SeqCst: they share the word whose
    // CASes the overlap argument and the sweeper order (DESIGN.md §7).
    // ----------------------------------------------------------------------

    /// T4: `Pending -> Accepted`; fails if a winner rejected the node.
    pub(crate) fn commit(&self) -> bool {
        self.update_state(|st| {
            (st.phase() == Phase::Pending).then(|| st.with_phase(Phase::Accepted))
        })
        .is_ok()
    }

    /// T3/T4: `Pending -> Rejected`; `Err(current)` if it is not pending.
    pub(crate) fn reject_if_pending(&self) -> Result<State, State> {
        self.update_state(|st| {
            (st.phase() == Phase::Pending).then(|| st.with_phase(Phase::Rejected))
        })
    }

    /// T6 (or a pass's help at P3): `Accepted -> Live`, keeping holds and
    /// pins (a pass may have done it first).
    pub(crate) fn make_live(&self) {
        let _ = self
            .update_state(|st| (st.phase() == Phase::Accepted).then(|| st.with_phase(Phase::Live)));
    }

    /// U1: `Live -> Dead`, adding a hold for the caller if a pass holds the
    /// segment. `Ok(held)`, or `Err(())` if the node was not live.
    pub(crate) fn kill(&self) -> Result<bool, ()> {
        self.update_state(|st| {
            let hold = if st.holds() > 0 { HOLD_ONE } else { 0 };
            (st.phase() == Phase::Live).then(|| State(st.with_phase(Phase::Dead).0 + hold))
        })
        .map(|old| old.holds() > 0)
        .map_err(drop)
    }

    /// U1a: the node has left the page map; only now may a sweep claim it.
    pub(crate) fn mark_withdrawn(&self) {
        self.get().state.fetch_or(WITHDRAWN, Ordering::SeqCst);
    }

    /// The one thread whose index removal succeeded clears `IN_INDEX`; the
    /// state as it was.
    pub(crate) fn leave_index(&self) -> State {
        State(self.get().state.fetch_and(!IN_INDEX, Ordering::SeqCst))
    }

    /// P3 (and forget): a hold on a committed node, helping an `Accepted`
    /// one to `Live`; anything else is not in the pass's set.
    pub(crate) fn try_hold(&self) -> bool {
        self.update_state(|st| {
            st.is_committed()
                .then(|| State(st.with_phase(Phase::Live).0 + HOLD_ONE))
        })
        .is_ok()
    }

    /// Drops one hold. The caller must not touch the node afterwards unless
    /// it holds it otherwise (it may be swept and freed).
    pub(crate) fn release_hold(&self) -> Released {
        let prev = State(self.get().state.fetch_sub(HOLD_ONE, Ordering::SeqCst));
        debug_assert!(prev.holds() > 0);
        let last_on_dead = prev.holds() == 1 && prev.phase() == Phase::Dead;
        Released {
            last_on_dead,
            sweepable: last_on_dead && prev.pins() == 0,
        }
    }

    /// A watermark pin, unless the node is unlinked (one CAS: the sweeper's
    /// unlink and the pin cannot both succeed).
    pub(crate) fn try_pin(&self) -> bool {
        self.update_state(|st| (!st.has(UNLINKED)).then(|| State(st.0 + PIN_ONE)))
            .is_ok()
    }

    /// A watermark pin on the sentinel, which is never unlinked.
    pub(crate) fn pin_sentinel(&self) {
        self.get().state.fetch_add(PIN_ONE, Ordering::SeqCst);
    }

    /// Drops a watermark pin; `true` if the node just became sweepable.
    pub(crate) fn unpin(&self) -> bool {
        let prev = State(self.get().state.fetch_sub(PIN_ONE, Ordering::SeqCst));
        prev.pins() == 1 && prev.holds() == 0 && prev.phase() == Phase::Dead
    }

    /// Sweep step 1: sets `UNLINKED` if the node is sweepable (or `true` if
    /// an earlier sweep already claimed it).
    pub(crate) fn claim_for_unlink(&self) -> bool {
        self.load_state().has(UNLINKED)
            || self
                .update_state(|st| st.is_sweepable().then_some(State(st.0 | UNLINKED)))
                .is_ok()
    }

    /// Sweep step 2: sets the deletion mark on the (non-null) link and
    /// returns the successor it froze.
    pub(crate) fn mark_link(&self) -> *mut Node<W> {
        // SeqCst: the mark and the swings of other sweepers order on this
        // link.
        let mut n = self.get().next.load(Ordering::SeqCst);
        loop {
            if n as usize & MARK != 0 {
                return untag(n);
            }
            let marked = (n as usize | MARK) as *mut Node<W>;
            match self
                .get()
                .next
                .compare_exchange(n, marked, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return n,
                Err(x) => n = x,
            }
        }
    }

    pub(crate) fn end(&self) -> usize {
        self.addr + self.len
    }

    pub(crate) fn segment(&self) -> Segment {
        Segment {
            addr: self.addr,
            len: self.len,
            seq: self.seq(),
        }
    }
}

/// The deletion mark on a log link: set on `x.next` (never null then) once
/// `x` is logically unlinked, freezing the link (Harris). Appends only CAS
/// null links, so the mark never gets in their way.
pub(crate) const MARK: usize = 1;

/// Strips the deletion mark.
pub(crate) fn untag<W>(p: *mut Node<W>) -> *mut Node<W> {
    (p as usize & !MARK) as *mut Node<W>
}

/// What releasing a hold found.
pub(crate) struct Released {
    /// It was the last hold on an untracked segment: free its memory.
    pub(crate) last_on_dead: bool,
    /// The node just became sweepable (count it for the next sweep).
    pub(crate) sweepable: bool,
}
