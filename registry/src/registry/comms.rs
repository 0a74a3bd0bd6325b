//! Comms: their slots, attach, forget, pending counts and the orphans of
//! panicking passes (DESIGN.md, "forget(c)" and "panic").

use std::ptr;

use super::Registry;
use crate::comm_state::{CommState, BUSY};
use crate::counters::Counters;
use crate::error::CommError;
use crate::faults::NaiveSeq;
use crate::index::AddressIndex;
use crate::node::Node;
use crate::results::{release_hold, Forgotten, HandBack, Hold};
use crate::sync::{fence, uninstrumented, Arc, AtomicPtr, AtomicU64, Ordering};
use crate::{CommId, Segment};

/// One attached comm.
pub(super) struct CommSlot<C, W> {
    pub(super) id: CommId,
    pub(super) payload: C,
    /// `BUSY` while a pass runs; `FORGOTTEN` once forgotten (final). Shared
    /// with the comm's window records.
    pub(super) state: Arc<CommState>,
    /// The watermark: the last log node this comm's passes have processed.
    /// Pinned (state word) so the sweeper keeps it linked. Written only by
    /// the pass that holds `BUSY` (or by `forget` when none does).
    pub(super) cursor: AtomicPtr<Node<W>>,
    /// The naive negative control's "highest seq seen" (test-support only).
    pub(super) naive_max_seq: NaiveSeq,
    /// The checked passes this comm has taken part in (the digest's
    /// `passes`). Written only by the BUSY owner.
    pub(super) checked_passes: AtomicU64,
    /// What a pass whose callback panicked could not report: handed to the
    /// next pass on this comm, or to `forget`. A std mutex, touched only on
    /// that path, by the BUSY owner or by forget.
    pub(super) orphans: std::sync::Mutex<Orphans<W>>,
    /// Set after parking orphans, cleared by whoever takes them (a std
    /// atomic like the mutex: only the BUSY owner or forget touch it).
    pub(super) has_orphans: uninstrumented::AtomicBool,
}

/// Hand-backs and frees of a pass that unwound (see `CommSlot::orphans`).
pub(super) struct Orphans<W> {
    pub(super) handed_back: Vec<(Segment, W, *const Node<W>)>,
    pub(super) free_now: Vec<Segment>,
}

/// Orphans of forgotten comms (see `Registry::take_orphans`).
pub(super) struct RegistryOrphans<W> {
    pub(super) handed_back: Vec<(CommId, Segment, W, *const Node<W>)>,
    pub(super) free_now: Vec<Segment>,
}

/// Locks a std mutex that only guards plain data: a panic while it was
/// held cannot leave that data half-written.
pub(super) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<C, W> CommSlot<C, W> {
    /// Takes the orphans as hand-backs (each keeps the hold it had).
    pub(super) fn take_orphans<'r>(
        &self,
        counters: &'r Counters,
    ) -> (Vec<HandBack<'r, W>>, Vec<Segment>) {
        // Acquire: pairs with the Release store made after parking. The
        // common case (nothing parked) takes no lock.
        if !self
            .has_orphans
            .swap(false, uninstrumented::Ordering::Acquire)
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

impl<C, W, I: AddressIndex> Registry<C, W, I> {
    /// Attaches a comm. Its id is never reused, and ids grow in attach order.
    /// Its first pass registers every tracked segment.
    pub fn attach(&self, payload: C) -> CommId {
        // Relaxed: uniqueness only; the slot is published by the lock.
        let id = CommId(self.next_comm.fetch_add(1, Ordering::Relaxed) + 1);
        // SAFETY: the sentinel lives as long as the registry.
        let head = unsafe { &*self.head };
        head.pin_sentinel();
        let slot = Arc::new(CommSlot {
            id,
            payload,
            state: Arc::new(CommState::new()),
            cursor: AtomicPtr::new(self.head),
            naive_max_seq: NaiveSeq::default(),
            checked_passes: AtomicU64::new(0),
            orphans: std::sync::Mutex::new(Orphans {
                handed_back: Vec::new(),
                free_now: Vec::new(),
            }),
            has_orphans: uninstrumented::AtomicBool::new(false),
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

    pub(super) fn slot(&self, comm: CommId) -> Option<Arc<CommSlot<C, W>>> {
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
            unpin_watermark(c, &self.counters);
        }
        fence(Ordering::SeqCst);
        let _guard = self.reclaimer.guard();
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
            if !o.get().records.has_open(comm) || !o.try_hold() {
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
        let _guard = self.reclaimer.guard();
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
}

/// Drops a comm's watermark pin on `node`, counting the node for the next
/// sweep if that made it sweepable.
pub(super) fn unpin_watermark<W>(node: *const Node<W>, counters: &Counters) {
    // SAFETY: a pinned node is never unlinked, so never freed.
    if unsafe { &*node }.unpin() {
        counters.became_sweepable();
    }
}
