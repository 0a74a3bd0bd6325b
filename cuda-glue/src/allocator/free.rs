//! Freeing: untrack, deregister every window (or queue it to a pass in
//! flight on its comm), and `ncclMemFree` once the segment's countdown
//! reaches zero (see the module docs of [`allocator`](super)).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use segment_registry::{CommId, Hold, Segment, Untracked};

use super::comm::{CommEntry, ABORTED};
use super::deadline::comm_gone;
use super::pass::DEREGISTER;
use super::Allocator;
use crate::backend::{Backend, Window};
use crate::error::FreeError;
use crate::stats::bump;
use crate::util::{lock, read};

/// A freed segment waiting for its deregistrations and the registry's
/// last hold (see the module docs).
pub(super) struct PendingFree {
    addr: usize,
    remaining: AtomicUsize,
}

/// A deregistration to perform on a comm.
pub(super) struct Deferred {
    pub(super) segment: Segment,
    pub(super) window: Window,
    /// The freed segment it counts down, if any (detach deregisters windows
    /// of live segments: no countdown).
    pub(super) free: Option<Arc<PendingFree>>,
}

/// What a free did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreeReport {
    /// The segment freed.
    pub segment: Segment,
    /// Windows it had (one per comm it was registered with).
    pub windows: usize,
    /// Of those, deregistrations queued to a comm with a call in flight
    /// (performed by that comm's pass right after its current call).
    pub deferred: usize,
    /// Whether a registration pass still held the segment: that pass
    /// registers it, deregisters the window and frees the memory if it lets
    /// go last.
    pub held_by_pass: bool,
}

/// A freed segment's countdown as the free sees it.
struct Countdown {
    pending: Arc<PendingFree>,
    /// Published in `held_frees`, where the last hold's releaser finds it.
    linked: bool,
}

impl<B: Backend> Allocator<B> {
    /// Untracks the allocation at `ptr`, deregisters its windows (or queues
    /// each to its comm's pass if that comm has a call in flight), and
    /// frees the memory after the last deregistration and the registry's
    /// last hold, on whichever thread does the last of them. Never waits
    /// for a registration pass.
    pub fn free(&self, ptr: usize) -> Result<FreeReport, FreeError> {
        if ptr == 0 {
            bump(&self.counters.bad_frees);
            return Err(FreeError::Null);
        }
        // The detach barrier: held until every window is performed or
        // queued.
        let table = read(&self.comms);
        let Ok(untracked) = self.registry.untrack(ptr) else {
            bump(&self.counters.bad_frees);
            return Err(FreeError::Unknown { ptr });
        };
        bump(&self.counters.frees);
        let Untracked {
            segment,
            windows,
            pass_hold,
        } = untracked;
        let held_by_pass = pass_hold.is_some();
        // A record may exist already, made for a hand-back whose
        // deregistration failed (it carries the registry's share); else a
        // new one, published if a hold may outlive ours.
        let (pending, linked) = self.join_countdown(segment, windows.len(), held_by_pass);
        let countdown = Countdown { pending, linked };
        let report = FreeReport {
            segment,
            windows: windows.len(),
            deferred: self.deregister_all(&table, segment, windows, &countdown.pending),
            held_by_pass,
        };
        drop(table);
        self.release_untrack_hold(segment, pass_hold, countdown);
        Ok(report)
    }

    /// Adds `parties` to freed `segment`'s countdown: the record already in
    /// `held_frees`, else a new one that also counts the registry's share,
    /// published there if `publish` (before the caller's hold is released,
    /// so that whoever releases the last hold finds it). Returns the record
    /// and whether it is in `held_frees`.
    pub(super) fn join_countdown(
        &self,
        segment: Segment,
        parties: usize,
        publish: bool,
    ) -> (Arc<PendingFree>, bool) {
        let mut map = lock(&self.held_frees);
        let key = (segment.addr, segment.seq);
        if let Some(p) = map.get(&key) {
            // AcqRel: as in `count_down`; the caller's hold keeps the
            // registry's share counted, so this never revives a zero count.
            p.remaining.fetch_add(parties, Ordering::AcqRel);
            return (p.clone(), true);
        }
        let p = Arc::new(PendingFree {
            addr: segment.addr,
            remaining: AtomicUsize::new(parties + 1),
        });
        // Relaxed: statistics.
        self.counters.pending_frees.fetch_add(1, Ordering::Relaxed);
        if publish {
            map.insert(key, p.clone());
        }
        (p, publish)
    }

    /// Deregisters each of a freed segment's windows on its comm now, or
    /// queues it to the comm's claimant. Returns how many were queued.
    fn deregister_all(
        &self,
        table: &BTreeMap<CommId, Arc<CommEntry>>,
        segment: Segment,
        windows: Vec<(CommId, Window)>,
        pending: &Arc<PendingFree>,
    ) -> usize {
        let mut deferred = 0;
        for (comm, window) in windows {
            let job = Deferred {
                segment,
                window,
                free: Some(pending.clone()),
            };
            match table.get(&comm) {
                Some(entry) => {
                    if entry.gate.submit(job, |j| self.run_deferred(entry, j)) {
                        deferred += 1;
                        bump(&self.counters.deregisters_deferred);
                    }
                }
                None => {
                    // Unreachable while every untrack goes through here (see
                    // the detach barrier); the comm is gone, so is its window.
                    bump(&self.counters.orphans);
                    self.note(format!("{window:?} of vanished {comm} dropped"));
                    self.count_down(pending);
                }
            }
        }
        deferred
    }

    /// Releases the hold `untrack` gave the free (if a pass held the
    /// segment); if the registry is done with the segment, counts its share
    /// down.
    fn release_untrack_hold(
        &self,
        segment: Segment,
        hold: Option<Hold<'_, Window>>,
        countdown: Countdown,
    ) {
        let registry_done = hold.is_none_or(Hold::release);
        if registry_done {
            if countdown.linked {
                lock(&self.held_frees).remove(&(segment.addr, segment.seq));
            }
            self.count_down(&countdown.pending);
        }
    }

    /// One party of a freed segment is done; the last one frees the memory.
    pub(super) fn count_down(&self, pending: &PendingFree) {
        // AcqRel: every party's deregistration happens before the last
        // party's ncclMemFree.
        if pending.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        self.counters.pending_frees.fetch_sub(1, Ordering::Relaxed); // Relaxed: statistics.
        match self.backend.mem_free(pending.addr) {
            Ok(()) => bump(&self.counters.mem_frees),
            Err(e) => {
                bump(&self.counters.mem_free_failures);
                self.note(format!("ncclMemFree({:#x}): {e}", pending.addr));
            }
        }
    }

    /// Performs one deregistration on `entry`'s comm (the caller has the
    /// comm claimed). A failure keeps the job (and the memory) for a retry.
    pub(super) fn run_deferred(&self, entry: &CommEntry, job: Deferred) {
        if entry.state() == ABORTED {
            // NCCL freed the window inside the comm's abort.
            return self.drop_deferred(job);
        }
        let r = self.within(entry, DEREGISTER, |wait| {
            self.backend
                .comm_window_deregister_within(entry.raw, job.window, wait)
        });
        match r {
            Ok(()) => {
                bump(&self.counters.windows_deregistered);
                if let Some(p) = &job.free {
                    self.count_down(p);
                }
            }
            Err(e) if comm_gone(&e) => self.drop_deferred(job),
            Err(e) => {
                bump(&self.counters.deregister_failures);
                self.note(format!(
                    "deregistering {:?} of segment {:#x} on {}: {e}",
                    job.window, job.segment.addr, entry.id
                ));
                lock(&entry.stuck).push(job);
            }
        }
    }

    /// Retries the failed deregistrations of a comm (an aborted one's are
    /// dropped by `run_deferred`).
    pub(super) fn retry_stuck(&self, entry: &CommEntry) {
        let jobs = std::mem::take(&mut *lock(&entry.stuck));
        for job in jobs {
            entry.gate.submit(job, |j| self.run_deferred(entry, j));
        }
    }

    /// Frees every live allocation, in track order (for shutdown). Returns
    /// how many were freed.
    pub fn free_all(&self) -> usize {
        self.registry
            .segments_by_seq()
            .into_iter()
            .filter(|s| self.free(s.addr).is_ok())
            .count()
    }
}
