//! The log: append (T5), walks, the sweep that unlinks dead nodes, and
//! retirement through the reclaimer (DESIGN.md, "Log" and "sweep").

use std::ptr;

use super::Registry;
use crate::index::AddressIndex;
use crate::node::Node;
use crate::sync::{Guard, Ordering};

impl<C, W, I: AddressIndex> Registry<C, W, I> {
    /// Appends `node` to the log (Michael-Scott): the CAS that links it after
    /// the last node also fixes its seq as that node's seq + 1.
    pub(super) fn append(&self, node: *mut Node<W>) {
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

    /// Unlinks the sweepable nodes of the log, up to its end as of now.
    ///
    /// Any number of threads may sweep at once (Harris-style): a node is
    /// first claimed by setting `UNLINKED` in its state word (one CAS, which
    /// also checks it is dead, out of the index, unheld and unpinned), then
    /// its link is marked (frozen), then one CAS on its predecessor's link
    /// swings past it. Whoever wins that CAS retires it; if it fails (the
    /// predecessor was being unlinked too), a later sweep finishes the job.
    /// A sweeper that is descheduled therefore delays nobody.
    pub(super) fn sweep(&self, guard: &Guard) {
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
            let claimed = c.claim_for_unlink();
            if !claimed {
                prev = cur;
                cur = next;
                continue;
            }
            // Freeze the link (the successor can no longer change), then
            // swing the predecessor past `c`. SeqCst: the mark and the swing
            // order against other sweepers' swings of the same links.
            let succ = c.mark_link();
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
    pub(super) fn last_node(&self) -> *const Node<W> {
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
    pub(super) fn retire(&self, o: &Node<W>, guard: &Guard) {
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

    /// Calls `f` on each node after `from`, up to and including `to` (or to
    /// the end if `to` is null). The caller holds a guard.
    pub(super) fn walk_log(
        &self,
        from: *const Node<W>,
        to: *const Node<W>,
        mut f: impl FnMut(&Node<W>),
    ) {
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
}
