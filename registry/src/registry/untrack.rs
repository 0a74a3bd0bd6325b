//! Untrack (steps U1–U4 of DESIGN.md) and drain.

use super::Registry;
use crate::error::UntrackError;
use crate::index::AddressIndex;
use crate::node::Node;
use crate::results::{Hold, Untracked};
use crate::CommId;

/// What untrack's steps U1-U2 leave for the rest of it.
struct Killed<'a, W> {
    node: &'a Node<W>,
    /// A pass held the segment at U1 (the caller got a hold too).
    held: bool,
    windows: Vec<(CommId, W)>,
}

impl<C, W, I: AddressIndex> Registry<C, W, I> {
    /// Untracks the segment that starts at `addr`.
    ///
    /// Lock-free; O(log n) plus an amortized O(1) share of log cleanup.
    /// Returns every window still registered for it, and a [`Hold`] if a
    /// registration pass still holds it (its memory must then wait).
    pub fn untrack(&self, addr: usize) -> Result<Untracked<'_, W>, UntrackError> {
        let guard = self.reclaimer.guard();
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
                let Ok(held) = o.kill() else { return false };

                // Step U1a: out of the page map; only then may a sweep
                // retire the node (`WITHDRAWN`), so no slot ever names a
                // retired node. SeqCst: the sweeper's claim CAS reads it.
                if !self.faults.skip_page_withdraw() {
                    self.pages
                        .withdraw(o.addr, o.end(), o as *const Node<W> as usize);
                }
                o.mark_withdrawn();

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
        let unswept = self.counters.became_sweepable();
        if self.counters.sweep_due(unswept, self.sweep_slack) {
            self.sweep(&guard);
        }

        Ok(Untracked {
            segment: o.segment(),
            windows,
            pass_hold: held.then(|| Hold::new(o, &self.counters)),
        })
    }

    /// Untracks every tracked segment, in seq order, and hands back all their
    /// windows (for shutdown; see [`Registry::untrack`] for each result).
    pub fn drain(&self) -> Vec<Untracked<'_, W>> {
        self.segments_by_seq()
            .into_iter()
            .filter_map(|s| self.untrack(s.addr).ok())
            .collect()
    }
}
