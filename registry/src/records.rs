//! A segment's window records: one per comm that registered it, in a
//! lock-free list (a Treiber stack that untrack can close), each window
//! claimed exactly once (DESIGN.md, "Records" and "window lookup").

use std::mem::ManuallyDrop;
use std::ptr;

use crate::comm_state::CommState;
use crate::faults::Switches;
use crate::sync::{Arc, AtomicBool, AtomicPtr, Ordering};
use crate::CommId;

/// One registration of a segment with one comm, and its window if any.
pub(crate) struct Record<W> {
    pub(crate) comm: CommId,
    /// The comm's state word: a lookup refuses the record once the comm is
    /// forgotten, even before anyone has claimed the window back.
    comm_state: Arc<CommState>,
    /// Set by whoever takes the window out: exactly one of untrack, forget,
    /// drain, or the pass that added the record.
    claimed: AtomicBool,
    /// Never written after the record is published: the claimer moves it
    /// out bitwise and `claimed` tells `Drop` not to drop it again. That is
    /// what lets a lookup copy a `W: Copy` window while another thread
    /// claims it.
    window: ManuallyDrop<Option<W>>,
    next: *mut Record<W>,
}

/// Tag on the list head once untrack has closed it.
const CLOSED: usize = 1;

/// A lock-free list of registration records (a Treiber stack that can be
/// closed).
pub(crate) struct Records<W> {
    head: AtomicPtr<Record<W>>,
    /// The list as it was when it was closed, kept so the node can free it.
    detached: AtomicPtr<Record<W>>,
}

/// What a lookup finds for one comm on one segment.
pub(crate) enum Registration<W> {
    /// Registered, with this window.
    Window(W),
    /// Registered without a window (no symmetric support).
    NoWindow,
    /// Not registered (or its window was handed back).
    None,
    /// Registered with a comm that has been forgotten since.
    Forgotten,
    /// The list is closed: the segment was untracked.
    Closed,
}

impl<W> Records<W> {
    pub(crate) fn new() -> Self {
        Records {
            head: AtomicPtr::new(ptr::null_mut()),
            detached: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Records a registration (`window == None`: registered without a
    /// window). Fails, giving the window back, if the list is closed (the
    /// segment was untracked). `faults.unchecked_window_add()` is the negative
    /// control that forgets to look.
    pub(crate) fn push(
        &self,
        comm: CommId,
        comm_state: &Arc<CommState>,
        window: Option<W>,
        faults: Switches,
    ) -> Result<*const Record<W>, Option<W>> {
        let rec = Box::into_raw(Box::new(Record {
            comm,
            comm_state: comm_state.clone(),
            claimed: AtomicBool::new(false),
            window: ManuallyDrop::new(window),
            next: ptr::null_mut(),
        }));
        // SeqCst (not just Release): the add is one side of two Dekker pairs,
        // against `close` (untrack) and against `forget`'s flag, see
        // DESIGN.md "Windows".
        let mut head = self.head.load(Ordering::SeqCst);
        loop {
            if head as usize & CLOSED != 0 && !faults.unchecked_window_add() {
                // SAFETY: `rec` was never shared; take it back whole.
                let rec = unsafe { Box::from_raw(rec) };
                return Err(ManuallyDrop::into_inner(rec.window));
            }
            let untagged = (head as usize & !CLOSED) as *mut Record<W>;
            // SAFETY: `rec` is still private to this thread.
            unsafe { (*rec).next = untagged };
            let new = if head as usize & CLOSED != 0 {
                // Negative control only: link behind the closed tag, where
                // nobody will ever claim it.
                (rec as usize | CLOSED) as *mut Record<W>
            } else {
                rec
            };
            match self
                .head
                .compare_exchange(head, new, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Ok(rec),
                Err(h) => head = h,
            }
        }
    }

    /// Closes the list and claims every window not claimed yet.
    pub(crate) fn close(&self, out: &mut Vec<(CommId, W)>) {
        // SeqCst: the other side of the Dekker pair with `push`.
        let head = self.head.swap(CLOSED as *mut Record<W>, Ordering::SeqCst);
        if head as usize & CLOSED != 0 {
            return; // already closed
        }
        // Release: read back only by `claim_comm` (Acquire) and by `Drop`.
        self.detached.store(head, Ordering::Release);
        claim_where(head, out, |_| true);
    }

    /// Claims the windows of one comm.
    pub(crate) fn claim_comm(&self, comm: CommId, out: &mut Vec<(CommId, W)>) {
        // Acquire: see the records pushed before, and their windows.
        let mut head = self.head.load(Ordering::Acquire);
        if head as usize & CLOSED != 0 {
            head = self.detached.load(Ordering::Acquire);
        }
        claim_where(head, out, |c| c == comm);
    }

    /// Claims one record that this thread pushed (forget raced the pass).
    pub(crate) fn claim_own(rec: *const Record<W>) -> Option<W> {
        // SAFETY: the record belongs to a node held by the caller's pass, so
        // the node (and its records) cannot be freed.
        claim(unsafe { &*rec })
    }

    /// Whether the list is open and holds an unclaimed window of `comm`.
    pub(crate) fn has_open(&self, comm: CommId) -> bool {
        let mut found = false;
        self.for_each_open(|r| found |= r.comm == comm && r.window.is_some());
        found
    }

    /// What is recorded for `comm`, copying the window (`W: Copy`, so a
    /// claimer moving it out concurrently is harmless). A record answers
    /// only while its comm is not forgotten (`lookup_ignores_forget` is the
    /// negative control that skips the check). Whether the window was
    /// claimed is not read: every claimer first closes the list (untrack)
    /// or sets the comm's `FORGOTTEN` (forget, a pass handing back), and
    /// `Registry::window_of` re-reads the node's state after this
    /// (DESIGN.md, "window lookup").
    pub(crate) fn lookup(&self, comm: CommId, faults: Switches) -> Registration<W>
    where
        W: Copy,
    {
        // Acquire: pairs with the closing swap, and sees the records pushed
        // before (and their windows).
        let head = self.head.load(Ordering::Acquire);
        if head as usize & CLOSED != 0 {
            return Registration::Closed;
        }
        let mut cur = head;
        while !cur.is_null() {
            // SAFETY: as in `for_each_open`.
            let r = unsafe { &*cur };
            if r.comm == comm {
                // One record per comm and segment.
                return if !faults.lookup_ignores_forget() && r.comm_state.is_forgotten() {
                    Registration::Forgotten
                } else {
                    match *r.window {
                        Some(w) => Registration::Window(w),
                        None => Registration::NoWindow,
                    }
                };
            }
            cur = r.next;
        }
        Registration::None
    }

    /// Calls `f` on each unclaimed record of an open list.
    pub(crate) fn for_each_open(&self, mut f: impl FnMut(&Record<W>)) {
        // Acquire: see the records pushed before, and their windows.
        let head = self.head.load(Ordering::Acquire);
        if head as usize & CLOSED != 0 {
            return;
        }
        let mut cur = head;
        while !cur.is_null() {
            // SAFETY: records live as long as their node, which the caller
            // keeps alive (a guard or a hold); `next` is immutable once the
            // record is published.
            let rec = unsafe { &*cur };
            // Acquire: a claimed record's window is gone.
            if !rec.claimed.load(Ordering::Acquire) {
                f(rec);
            }
            cur = rec.next;
        }
    }

    /// Number of windows not claimed yet, per comm.
    pub(crate) fn count_open(&self, mut f: impl FnMut(CommId)) {
        self.for_each_open(|r| {
            if r.window.is_some() {
                f(r.comm)
            }
        });
    }
}

fn claim<W>(rec: &Record<W>) -> Option<W> {
    // AcqRel: exactly one claimer wins; Acquire sees the window written
    // before the record was published.
    if rec.claimed.swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: we won the claim: nobody else moves the window out, and
    // `Drop` will not drop it (it checks `claimed`); concurrent lookups only
    // copy `W: Copy` values, which a bitwise move does not disturb.
    unsafe { ptr::read(&*rec.window) }
}

fn claim_where<W>(
    mut cur: *mut Record<W>,
    out: &mut Vec<(CommId, W)>,
    mut pick: impl FnMut(CommId) -> bool,
) {
    cur = (cur as usize & !CLOSED) as *mut Record<W>;
    while !cur.is_null() {
        // SAFETY: as in `for_each_open`.
        let rec = unsafe { &*cur };
        if pick(rec.comm) {
            if let Some(w) = claim(rec) {
                out.push((rec.comm, w));
            }
        }
        cur = rec.next;
    }
}

impl<W> Drop for Records<W> {
    fn drop(&mut self) {
        // Exclusive access: the node is being freed. Unclaimed windows are
        // dropped with their records.
        let head = self.head.load(Ordering::Relaxed);
        if head as usize & CLOSED != 0 {
            // The negative control may have linked records behind the tag.
            free_list((head as usize & !CLOSED) as *mut Record<W>);
            free_list(self.detached.load(Ordering::Relaxed));
        } else {
            free_list(head);
        }
    }
}

fn free_list<W>(mut cur: *mut Record<W>) {
    while !cur.is_null() {
        // SAFETY: exclusive access during drop; every record was made by
        // `Box::into_raw` and is in exactly one list.
        let mut rec = unsafe { Box::from_raw(cur) };
        cur = rec.next;
        // Relaxed: exclusive access.
        if !rec.claimed.load(Ordering::Relaxed) {
            // SAFETY: unclaimed, so the window was never moved out.
            unsafe { ManuallyDrop::drop(&mut rec.window) };
        }
    }
}

// SAFETY: a record's window is moved out by exactly one claimer (guarded by
// `claimed`), so sharing a list between threads only ever moves `W` across
// threads, which `W: Send` allows.
unsafe impl<W: Send> Send for Records<W> {}
// SAFETY: as above; `&Records` only gives access through the claim protocol.
unsafe impl<W: Send> Sync for Records<W> {}
