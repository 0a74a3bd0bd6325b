//! The allocator's figures: its counters and a snapshot of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use segment_registry::CommId;

use super::comm::{CommEntry, CommState};
use super::Allocator;
use crate::backend::{Backend, RawComm};
use crate::util::{lock, read};

/// Statistics counters. Relaxed everywhere: they are figures for reports,
/// never used to decide anything.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) allocs: AtomicU64,
    pub(super) alloc_failures: AtomicU64,
    pub(super) frees: AtomicU64,
    pub(super) bad_frees: AtomicU64,
    pub(super) passes: AtomicU64,
    pub(super) windows_registered: AtomicU64,
    pub(super) null_windows: AtomicU64,
    pub(super) register_failures: AtomicU64,
    pub(super) windows_deregistered: AtomicU64,
    pub(super) deregisters_deferred: AtomicU64,
    pub(super) handed_back: AtomicU64,
    pub(super) deregister_failures: AtomicU64,
    pub(super) pending_frees: AtomicU64,
    pub(super) mem_frees: AtomicU64,
    pub(super) mem_free_failures: AtomicU64,
    pub(super) orphans: AtomicU64,
}

pub(super) fn bump(c: &AtomicU64) {
    // Relaxed: statistics only.
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    // Relaxed: statistics only.
    c.load(Ordering::Relaxed)
}

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
}

/// A snapshot of the allocator's figures (weakly consistent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocatorStats {
    /// Tracked segments.
    pub live_segments: usize,
    /// Bytes in tracked segments.
    pub live_bytes: usize,
    /// Successful allocations.
    pub allocs: u64,
    /// Failed allocations.
    pub alloc_failures: u64,
    /// Successful frees.
    pub frees: u64,
    /// Refused frees (null, unknown pointer, double free).
    pub bad_frees: u64,
    /// Registration passes run.
    pub passes: u64,
    /// Registrations that returned a window.
    pub windows_registered: u64,
    /// Registrations that returned a null window.
    pub null_windows: u64,
    /// Registrations that failed.
    pub register_failures: u64,
    /// Windows deregistered.
    pub windows_deregistered: u64,
    /// Deregistrations queued to a comm with a call in flight.
    pub deregisters_deferred: u64,
    /// Windows that passes handed back (segment freed while held).
    pub handed_back: u64,
    /// Deregistrations that failed (each is retried).
    pub deregister_failures: u64,
    /// Deregistrations failed and not yet retried successfully.
    pub windows_stuck: usize,
    /// Freed segments whose memory waits for deregistrations or a pass.
    pub pending_frees: u64,
    /// `ncclMemFree` calls that succeeded.
    pub mem_frees: u64,
    /// `ncclMemFree` calls that failed.
    pub mem_free_failures: u64,
    /// Attached comms, in attach order.
    pub comms: Vec<CommInfo>,
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
                }
            })
            .collect();
        let c = &self.counters;
        AllocatorStats {
            live_segments: reg.live_segments,
            live_bytes: reg.live_bytes,
            allocs: get(&c.allocs),
            alloc_failures: get(&c.alloc_failures),
            frees: get(&c.frees),
            bad_frees: get(&c.bad_frees),
            passes: get(&c.passes),
            windows_registered: get(&c.windows_registered),
            null_windows: get(&c.null_windows),
            register_failures: get(&c.register_failures),
            windows_deregistered: get(&c.windows_deregistered),
            deregisters_deferred: get(&c.deregisters_deferred),
            handed_back: get(&c.handed_back),
            deregister_failures: get(&c.deregister_failures),
            windows_stuck: stuck_total,
            pending_frees: get(&c.pending_frees),
            mem_frees: get(&c.mem_frees),
            mem_free_failures: get(&c.mem_free_failures),
            comms,
        }
    }
}
