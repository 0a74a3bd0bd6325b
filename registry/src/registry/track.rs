//! Track (steps T0–T6 of DESIGN.md): insert as pending, fence, settle
//! every overlapping pair, commit, publish in the page map, append to the
//! log, go live.

use super::Registry;
use crate::error::TrackError;
use crate::index::{AddressIndex, NodeRef};
use crate::node::Node;
use crate::state::{Phase, State};
use crate::sync::{fence, Guard, Ordering};
use crate::Segment;

impl<C, W, I: AddressIndex> Registry<C, W, I> {
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
        let guard = self.reclaimer.guard();
        let node = Box::into_raw(Box::new(Node::<W>::new(addr, len, State::new_pending())));
        self.counters.allocated();
        // SAFETY: just allocated; freed only through the protocol below.
        let me = unsafe { &*node };
        if self.faults.naive_cursor() {
            // Negative control: seq taken before the segment is visible.
            me.set_seq(self.naive_seq.next());
        }
        let me_ref = NodeRef::from_ptr(node);

        // Step T1: insert as Pending.
        self.insert_pending(node, me_ref, &guard)?;

        // Step T2: the fence that makes two racing overlapping tracks see
        // each other (store-buffer pattern, DESIGN.md "Overlap").
        if !self.faults.skip_overlap_fence() {
            fence(Ordering::SeqCst);
        }

        // Step T3: scan and settle every overlapping pair.
        let verdict = self.settle_overlaps(me, end);

        // Step T4: commit Pending -> Accepted, unless a winner rejected us.
        let verdict =
            verdict.and_then(|()| me.commit().then_some(()).ok_or_else(|| me.beaten_by()));
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
        me.make_live();
        if late {
            self.publish_pages(me);
        }
        Ok(me.segment())
    }

    /// Step T1: inserts `node` (pending, never shared yet) in the index,
    /// helping a dead or rejected entry at its address out first. On an
    /// overlap with a pending or committed entry, frees `node` and fails.
    fn insert_pending(
        &self,
        node: *mut Node<W>,
        me_ref: NodeRef,
        guard: &Guard,
    ) -> Result<(), TrackError> {
        // SAFETY: the caller's node, not shared yet.
        let me = unsafe { &*node };
        let (addr, len) = (me.addr, me.len);
        loop {
            match self.index.insert(addr, me_ref) {
                Ok(()) => return Ok(()),
                Err(other) => {
                    // SAFETY: nodes reached through the index are protected
                    // by the guard (DESIGN.md, "Who frees what").
                    let o = unsafe { &*other.as_ptr::<Node<W>>() };
                    match o.load_state().phase() {
                        Phase::Dead | Phase::Rejected => {
                            // A stale entry on its way out: help remove it.
                            if self.index.remove(addr, other) {
                                self.after_index_removal(o, guard);
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
    }

    /// Step T4a: publishes a committed node in the page map.
    fn publish_pages(&self, me: &Node<W>) {
        self.pages.publish(
            me.addr,
            me.end(),
            me as *const Node<W> as usize,
            self.faults,
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
        let tried = if i_win {
            o.reject_if_pending()
        } else {
            Err(o.load_state())
        };
        let st = match tried {
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
        let _ = me.reject_if_pending();
        if self.index.remove(me.addr, me_ref) {
            self.after_index_removal(me, guard);
        }
    }

    /// Called by the one thread whose index removal of `o` succeeded.
    pub(super) fn after_index_removal(&self, o: &Node<W>, guard: &Guard) {
        if o.leave_index().phase() == Phase::Rejected {
            // Never logged: out of the index means unreachable.
            self.retire(o, guard);
        }
    }
}
