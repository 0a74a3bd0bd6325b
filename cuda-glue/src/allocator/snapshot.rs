//! A snapshot of the allocator's figures: its counters, the registry's
//! counts, and each attached comm's state.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use segment_registry::CommId;

use super::checked::CommOwner;
use super::comm::{CommEntry, CommState};
use super::Allocator;
use crate::backend::{Backend, RawComm};
use crate::stats::{AllocatorStats, Figures};
use crate::util::{lock, read};

/// Per-comm figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommInfo {
    /// The comm's id.
    pub comm: CommId,
    /// Its raw handle.
    pub raw: RawComm,
    /// Its state.
    pub state: CommState,
    /// Windows registered for live segments.
    pub windows: usize,
    /// Live segments its next pass would register.
    pub pending: usize,
    /// `Some(false)` once a registration returned a null window (no
    /// symmetric support), `Some(true)` once one returned a window, `None`
    /// before any.
    pub symmetric: Option<bool>,
    /// Why it failed, if it did.
    pub failure: Option<String>,
    /// Deregistrations that failed and wait for a retry.
    pub stuck: usize,
    /// Deregistrations queued behind a call in flight.
    pub queued: usize,
    /// Whether its passes are checked (agree before they register).
    pub checked: bool,
    /// The deadline of each collective call on it.
    pub deadline: Duration,
    /// Whether a call past its deadline can be ended (an owned comm, or a
    /// borrowed non-blocking one with an abort hook); else it is only
    /// reported.
    pub abortable: bool,
}

impl<B: Backend> Allocator<B> {
    /// A weakly consistent snapshot of the figures.
    pub fn stats(&self) -> AllocatorStats {
        let reg = self.registry.stats();
        let per: HashMap<CommId, (usize, usize)> = reg
            .comms
            .iter()
            .map(|c| (c.comm, (c.windows, c.pending)))
            .collect();
        let entries: Vec<Arc<CommEntry>> = read(&self.comms).values().cloned().collect();
        let mut stuck_total = 0;
        let comms = entries
            .iter()
            .map(|e| {
                let stuck = lock(&e.stuck).len();
                stuck_total += stuck;
                let (windows, pending) = per.get(&e.id).copied().unwrap_or((0, 0));
                // Relaxed: diagnostic flags.
                let (w, n) = (
                    e.saw_window.load(Ordering::Relaxed),
                    e.saw_null_window.load(Ordering::Relaxed),
                );
                CommInfo {
                    comm: e.id,
                    raw: e.raw,
                    state: e.public_state(),
                    windows,
                    pending,
                    symmetric: if n { Some(false) } else { w.then_some(true) },
                    failure: lock(&e.failure).clone(),
                    stuck,
                    queued: e.gate.queued(),
                    checked: e.agreement.is_some(),
                    deadline: e.deadline,
                    abortable: !matches!(e.owner, CommOwner::Borrowed),
                }
            })
            .collect();
        let figures = Figures {
            live_segments: reg.live_segments,
            live_bytes: reg.live_bytes,
            windows_stuck: stuck_total,
        };
        AllocatorStats::new(&self.counters, figures, comms)
    }
}
