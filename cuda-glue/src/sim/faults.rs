//! Injected faults: the `nth` call of an operation on a rank fails.

use super::calls::SimOp;
use super::world::WorldState;
use super::SimWorld;
use crate::backend::BackendError;
use crate::util::lock;

/// An armed fault.
pub(super) struct Fault {
    rank: usize,
    op: SimOp,
    nth: u64,
    seen: u64,
}

impl SimWorld {
    /// Arms a fault: the `nth` call (1-based, counted from now) of `op` on
    /// `rank` fails with [`BackendError::Injected`]. A failed register
    /// still counts as a collective call; a failed deregister leaves the
    /// window registered; a failed free leaves the memory allocated.
    pub fn fail_nth(&self, rank: usize, op: SimOp, nth: u64) {
        lock(&self.state).faults.push(Fault {
            rank,
            op,
            nth: nth.max(1),
            seen: 0,
        });
    }
}

impl WorldState {
    /// Counts a call of `op` on `rank` against the armed faults; the error
    /// of one that reaches its number.
    pub(super) fn fault(&mut self, rank: usize, op: SimOp) -> Option<BackendError> {
        let mut fired = None;
        // Every armed fault counts the call; one that reaches its number is
        // spent (the first such one reports).
        self.faults.retain_mut(|f| {
            if f.rank != rank || f.op != op {
                return true;
            }
            f.seen += 1;
            if f.seen < f.nth {
                return true;
            }
            fired.get_or_insert(BackendError::Injected {
                call: op.call(),
                nth: f.nth,
                rank,
            });
            false
        });
        fired
    }
}
