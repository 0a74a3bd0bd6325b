//! Registration passes: the entry points (P0) and a running pass (steps
//! P1–P4 and finish of DESIGN.md).

use std::collections::BTreeMap;
use std::mem::ManuallyDrop;
use std::ptr;

use super::comms::{lock, unpin_watermark, CommSlot};
use super::Registry;
use crate::agreement::Digest;
use crate::comm_state::FORGOTTEN;
use crate::error::{CommError, PassError};
use crate::index::AddressIndex;
use crate::node::Node;
use crate::records::Records;
use crate::results::{release_hold, HandBack, Hold, PassFailure, PassReport, PassResult};
use crate::sync::{fence, uninstrumented, Arc, Ordering};
use crate::{CommId, Segment};

impl<C, W, I: AddressIndex> Registry<C, W, I> {
    /// Runs a registration pass for `comm`: calls `register` on every segment
    /// that was tracked, not registered with `comm`, and not untracked when
    /// the pass began, in seq order, and records each window it returns
    /// (`Ok(None)`: registered without a window).
    ///
    /// The set is fixed when the pass begins: every segment whose track
    /// returned before is in it, none whose track begins after; it is
    /// always a prefix in seq order, so ranks that track in the same order
    /// register the same segments in the same order. (A track still in
    /// flight may be in it although a lookup does not find it yet: passes
    /// linearize with tracks ordered by seq, not with lookups; DESIGN.md
    /// §6.) A segment untracked while the
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
        let slot = take_busy(&comms, comm).map_err(fail)?;
        // Step P0: nothing pending and nothing parked, decided in O(1) with
        // no epoch pin. The read lock keeps `forget` from removing the slot
        // (so FORGOTTEN cannot be set while we are BUSY here).
        // Acquire: pairs with the Release store made after parking.
        if !slot.has_orphans.load(uninstrumented::Ordering::Acquire) {
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
        PassRun::start(self, slot).run(register)
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
}

/// Step P0's first half: finds the comm's slot and takes its `BUSY`.
pub(super) fn take_busy<C, W>(
    comms: &BTreeMap<CommId, Arc<CommSlot<C, W>>>,
    comm: CommId,
) -> Result<&Arc<CommSlot<C, W>>, CommError> {
    let slot = comms.get(&comm).ok_or(CommError::NotAttached(comm))?;
    slot.state.try_begin_pass().map_err(|s| {
        if s & FORGOTTEN != 0 {
            CommError::NotAttached(comm)
        } else {
            CommError::Busy(comm)
        }
    })?;
    Ok(slot)
}

/// One running pass. Its `Drop` restores the invariants if the callback
/// panics: the watermark moves past what was done, every remaining hold is
/// released, and the comm is no longer busy.
pub(super) struct PassRun<'r, C, W, I: AddressIndex> {
    reg: &'r Registry<C, W, I>,
    /// The comm's slot, kept alive by the pass (callbacks may forget the
    /// comm, which removes it from the table).
    slot: Arc<CommSlot<C, W>>,
    /// The pass's set, in seq order, each node held.
    held: Vec<*const Node<W>>,
    /// Index in `held` of the next node to register.
    next: usize,
    /// The last node registered, still held (by the pass, or by a hand-back
    /// in the report) so that it can become the watermark.
    last_done: Option<*const Node<W>>,
    /// Whether the pass itself (not a hand-back) holds `last_done`.
    owns_last: bool,
    /// The last log node when the pass began (pinned), or null if nothing
    /// was pending.
    end: *const Node<W>,
    report: PassReport<'r, W>,
    finished: bool,
}

/// How a pass ends, which decides who releases `BUSY`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Every segment of the set was registered.
    Complete,
    /// A callback error or a forgotten comm stopped it; `run` returns.
    Stopped,
    /// A callback panicked: `Drop` finishes the pass, parks its report and
    /// only then releases `BUSY`.
    CallbackPanicked,
}

impl<'r, C, W, I: AddressIndex> PassRun<'r, C, W, I> {
    /// A pass on `slot`, whose BUSY the caller holds: takes what an earlier
    /// panicking pass parked, then fixes the set (P1–P3).
    pub(super) fn start(reg: &'r Registry<C, W, I>, slot: Arc<CommSlot<C, W>>) -> Self {
        let report = PassReport::new(slot.id);
        let mut run = PassRun {
            reg,
            slot,
            held: Vec::new(),
            next: 0,
            last_done: None,
            owns_last: false,
            end: ptr::null(),
            report,
            finished: false,
        };
        (run.report.handed_back, run.report.free_now) = run.slot.take_orphans(&reg.counters);
        run.begin();
        run
    }

    /// Steps P1-P3: fix the set.
    fn begin(&mut self) {
        let reg = self.reg;
        let guard = reg.reclaimer.guard();
        // Acquire: see the cursor node the last pass published.
        let cursor = self.slot.cursor.load(Ordering::Acquire);
        // P1: nothing pending if the watermark is the last node: O(1).
        // SAFETY: the cursor node is pinned by this comm.
        let first = unsafe { &*cursor }.next_node();
        if first.is_null() {
            return;
        }
        // P2: the end of the set is the node whose link is null now.
        let end = loop {
            let t = reg.last_node();
            // SAFETY: a linked node, protected by the guard.
            if unsafe { &*t }.try_pin() {
                break t;
            }
        };
        self.end = end;
        // P3: hold every live node of (cursor, end].
        let naive = reg.faults.naive_cursor();
        let naive_max = self.slot.naive_max_seq.highest();
        let mut steps = 0;
        let held = &mut self.held;
        reg.walk_log(cursor, end, |o| {
            steps += 1;
            if naive && o.seq() <= naive_max {
                return;
            }
            if o.try_hold() {
                held.push(o);
            }
        });
        reg.counters
            .pass_steps
            .fetch_add(steps, uninstrumented::Ordering::Relaxed);
        drop(guard);
    }

    /// The comm's payload.
    pub(super) fn payload(&self) -> &C {
        &self.slot.payload
    }

    /// The checked passes the comm has taken part in.
    pub(super) fn checked_passes(&self) -> u64 {
        // Relaxed: only the BUSY owner (this pass) reads and writes it.
        self.slot.checked_passes.load(Ordering::Relaxed)
    }

    /// After an agreement: the count every rank adopts.
    pub(super) fn set_checked_passes(&self, n: u64) {
        // Relaxed: as above.
        self.slot.checked_passes.store(n, Ordering::Relaxed);
    }

    /// The digest of the set fixed at P3 (a checked pass's), as checked
    /// pass number `passes`.
    pub(super) fn digest(&self, passes: u64, abstain: bool) -> Digest {
        let mut d = if self.reg.faults.digest_from_second_walk() {
            self.digest_of_a_second_walk(passes)
        } else {
            let set: Vec<Segment> = self
                .held
                .iter()
                // SAFETY: held, so never unlinked or freed.
                .map(|&o| unsafe { &*o }.segment())
                .collect();
            Digest::of_set(passes, &set)
        };
        d.abstain = u64::from(abstain);
        d
    }

    /// The `digest_from_second_walk` negative control: the digest of the
    /// committed nodes of (cursor, end] as a second walk finds them, which
    /// is not the set the pass holds when an untrack or a track races it.
    fn digest_of_a_second_walk(&self, passes: u64) -> Digest {
        if self.end.is_null() {
            return Digest::of_set(passes, &[]);
        }
        let _guard = self.reg.reclaimer.guard();
        // Acquire: see the cursor node the last pass published.
        let cursor = self.slot.cursor.load(Ordering::Acquire);
        let mut set = Vec::new();
        self.reg.walk_log(cursor, self.end, |o| {
            if o.load_state().phase() == crate::state::Phase::Live {
                set.push(o.segment());
            }
        });
        Digest::of_set(passes, &set)
    }

    /// Step P4: the callbacks, with no guard and no lock held.
    pub(super) fn run<E, F>(mut self, mut register: F) -> PassResult<'r, W, E>
    where
        F: FnMut(&C, &Segment) -> Result<Option<W>, E>,
    {
        let comm = self.slot.id;
        while self.next < self.held.len() {
            if self.slot.state.is_forgotten() {
                return Err(self.stop(PassError::Forgotten(comm)));
            }
            let o = self.held[self.next];
            // SAFETY: held, so never unlinked or freed.
            let node = unsafe { &*o };
            let seg = node.segment();
            let window = match register(&self.slot.payload, &seg) {
                Ok(w) => w,
                Err(error) => {
                    return Err(self.stop(PassError::Callback {
                        segment: seg,
                        error,
                    }))
                }
            };
            if self.reg.faults.naive_cursor() {
                self.slot.naive_max_seq.saw(seg.seq);
            }
            self.report.registered.push(seg);
            let mut owns = true;
            match node
                .get()
                .records
                .push(comm, &self.slot.state, window, self.reg.faults)
            {
                Err(Some(w)) => {
                    // Untracked while we registered it: hand it back.
                    self.hand_back(o, seg, w);
                    owns = false;
                }
                Err(None) => {} // untracked meanwhile; nothing to hand back
                Ok(rec) => {
                    // Dekker with forget: add; fence; read the flag.
                    fence(Ordering::SeqCst);
                    if self.slot.state.is_forgotten() {
                        if let Some(w) = Records::claim_own(rec) {
                            self.hand_back(o, seg, w);
                            owns = false;
                        }
                    }
                }
            }
            // Keep this node's hold until the next one is done, so that it
            // can still become the watermark; drop the previous one's.
            self.release_last_done();
            self.last_done = Some(o);
            self.owns_last = owns;
            self.next += 1;
        }
        self.finish(Ending::Complete);
        Ok(std::mem::replace(&mut self.report, PassReport::new(comm)))
    }

    fn hand_back(&mut self, o: *const Node<W>, segment: Segment, window: W) {
        // The pass's hold moves into the hand-back.
        self.report.handed_back.push(HandBack {
            segment,
            comm: self.slot.id,
            window,
            hold: Hold::new(o, &self.reg.counters),
        });
    }

    fn release_last_done(&mut self) {
        if let Some(o) = self.last_done.take() {
            if std::mem::take(&mut self.owns_last) {
                self.release(o);
            }
        }
    }

    fn release(&mut self, o: *const Node<W>) {
        // Read the segment while the hold still keeps the node linked: once
        // released, a sweep may unlink and free it (this thread holds no
        // guard).
        // SAFETY: held by this pass until the next line.
        let seg = unsafe { &*o }.segment();
        if release_hold(o, &self.reg.counters) {
            self.report.free_now.push(seg);
        }
    }

    pub(super) fn stop<E>(&mut self, error: PassError<E>) -> PassFailure<'r, W, E> {
        self.finish(Ending::Stopped);
        PassFailure {
            error,
            report: std::mem::replace(&mut self.report, PassReport::new(self.slot.id)),
        }
    }

    /// Moves the watermark, releases what is still held, and (unless the
    /// callback panicked, see `Drop`) frees the comm.
    fn finish(&mut self, ending: Ending) {
        debug_assert!(!self.finished, "a pass finishes once");
        self.finished = true;
        let complete = ending == Ending::Complete;
        if !self.end.is_null() {
            // The new watermark: the end of the set if it all went through,
            // else the last node registered, if any.
            let new_cursor = if complete {
                Some(self.end)
            } else {
                unpin_watermark(self.end, &self.reg.counters);
                self.last_done.inspect(|&o| {
                    // SAFETY: still held (by us or a hand-back), so linked.
                    let pinned = unsafe { &*o }.try_pin();
                    debug_assert!(pinned, "a held node is never unlinked");
                })
            };
            if let Some(c) = new_cursor {
                // AcqRel: publish the new cursor to `pending` (readers under
                // a guard) and take the old one to unpin.
                let old = self.slot.cursor.swap(c as *mut _, Ordering::AcqRel);
                unpin_watermark(old, &self.reg.counters);
            }
        }
        self.release_last_done();
        let rest = std::mem::take(&mut self.held);
        for &o in &rest[self.next.min(rest.len())..] {
            self.release(o);
        }
        // A panicked callback: `Drop` parks the report first, then releases
        // BUSY. Whether the thread is unwinding says nothing here: a pass
        // may run (and fail) inside some other code's `Drop` during an
        // unrelated panic.
        if ending != Ending::CallbackPanicked {
            self.release_busy();
        }
    }

    /// Clears BUSY; if the comm was forgotten meanwhile, takes the watermark
    /// out and unpins it, and moves anything parked in the slot to the
    /// registry's orphans (nobody can reach the slot any more).
    fn release_busy(&mut self) {
        let prev = self.slot.state.end_pass();
        if prev & FORGOTTEN != 0 {
            // Readers find null: not attached.
            let c = self.slot.cursor.swap(ptr::null_mut(), Ordering::AcqRel);
            unpin_watermark(c, &self.reg.counters);
            let mut from = lock(&self.slot.orphans);
            let mut to = lock(&self.reg.orphans);
            to.handed_back.extend(
                from.handed_back
                    .drain(..)
                    .map(|(s, w, n)| (self.slot.id, s, w, n)),
            );
            to.free_now.append(&mut from.free_now);
        }
    }
}

impl<C, W, I: AddressIndex> Drop for PassRun<'_, C, W, I> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // The callback panicked. Restore the invariants, and park what the
        // report owes the caller (windows to deregister, memory to free)
        // for the next pass on this comm, or its forget, to hand back.
        // Park while still BUSY, so that neither `forget` nor the next pass
        // can look at the slot in between; then release BUSY.
        self.finish(Ending::CallbackPanicked);
        {
            let mut o = lock(&self.slot.orphans);
            for h in self.report.handed_back.drain(..) {
                let hold = ManuallyDrop::new(h.hold);
                o.handed_back.push((h.segment, h.window, hold.node));
            }
            o.free_now.append(&mut self.report.free_now);
        }
        // Release: publishes the parked orphans to `take_orphans`.
        self.slot
            .has_orphans
            .store(true, uninstrumented::Ordering::Release);
        self.release_busy();
    }
}
