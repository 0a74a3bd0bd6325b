//! Detaching a comm: after it, no call is ever made on the comm again.

use std::sync::atomic::Ordering;

use segment_registry::CommId;

use super::comm::{CommEntry, ABORTED, ACTIVE, DETACHED, DETACHING, FAILED};
use super::Allocator;
use crate::backend::Backend;
use crate::error::DetachError;
use crate::util::{lock, write};

/// What a successful detach did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetachReport {
    /// The comm.
    pub comm: CommId,
    /// Windows the comm still held that this call deregistered (retries
    /// of deregistrations that failed before are not counted).
    pub deregistered: usize,
}

impl<B: Backend> Allocator<B> {
    /// Detaches a comm: waits for a pass running on it, deregisters every
    /// window it holds, and makes sure no free still has one queued or in
    /// hand; a checked comm's private agreement comm is then destroyed
    /// (call it at the same point on every rank). Required before the comm
    /// is destroyed. An aborted comm is detached without any NCCL call
    /// (its windows left the accounting at the abort); it must not be
    /// destroyed (NCCL freed it). On
    /// [`DetachError::Incomplete`] the comm stays attached (no passes) and
    /// detach can be called again.
    pub fn detach(&self, comm: CommId) -> Result<DetachReport, DetachError> {
        let entry = self.entry(comm).ok_or(DetachError::NotAttached(comm))?;
        let _pass = lock(&entry.pass_lock);
        if entry.state() == DETACHED {
            return Err(DetachError::NotAttached(comm));
        }
        // An aborted comm stays aborted: what it held is dropped, not
        // deregistered. SeqCst: rare transition.
        let _ = entry
            .state
            .compare_exchange(ACTIVE, DETACHING, Ordering::SeqCst, Ordering::SeqCst);
        let _ = entry
            .state
            .compare_exchange(FAILED, DETACHING, Ordering::SeqCst, Ordering::SeqCst);
        let deregistered = self.forget_windows(&entry);
        // Barrier: frees that claimed a window of this comm before `forget`
        // hold the read lock until they have performed or queued it.
        drop(write(&self.comms));
        // Run what they queued (waits for a free that is running some).
        entry.gate.call(|| (), |j| self.run_deferred(&entry, j));
        let stuck = self.retry_stuck_here(&entry);
        let aborted = entry.state() == ABORTED;
        if stuck > 0 && !aborted {
            return Err(DetachError::Incomplete {
                comm,
                remaining: stuck,
                last: self.last_async_error().unwrap_or_default(),
            });
        }
        if aborted {
            self.drop_stuck(&entry);
        }
        entry.state.store(DETACHED, Ordering::SeqCst); // SeqCst: rare transition.
        let mut table = write(&self.comms);
        table.remove(&comm);
        self.unindex(&entry);
        drop(table);
        if let Some(a) = &entry.agreement {
            if aborted {
                self.drop_agreement(a);
            } else {
                // The private comm goes with it (at the same program point
                // on every rank, as the attach).
                self.close_agreement(a, entry.deadline);
            }
        }
        Ok(DetachReport { comm, deregistered })
    }

    /// Forgets the comm in the registry and deregisters the windows that
    /// claims. A retried detach finds the comm forgotten already: nothing
    /// new. Returns how many were deregistered.
    fn forget_windows(&self, entry: &CommEntry) -> usize {
        let Ok(forgotten) = self.registry.forget(entry.id) else {
            return 0;
        };
        let mut deregistered = 0;
        for hb in forgotten.windows {
            if self.hand_back(entry, hb.segment, hb.window, hb.hold) {
                deregistered += 1;
            }
        }
        for seg in forgotten.free_now {
            self.registry_released(seg);
        }
        deregistered
    }

    /// Retries failed deregistrations here and now (not queued to some
    /// other thread: after detach returns, no call may touch the comm).
    /// Returns how many still failed.
    fn retry_stuck_here(&self, entry: &CommEntry) -> usize {
        let jobs = std::mem::take(&mut *lock(&entry.stuck));
        for job in jobs {
            entry.gate.call(
                || self.run_deferred(entry, job),
                |j| self.run_deferred(entry, j),
            );
        }
        lock(&entry.stuck).len()
    }

    /// Detaches every attached comm, in attach order, and returns the
    /// results.
    pub fn detach_all(&self) -> Vec<(CommId, Result<DetachReport, DetachError>)> {
        self.comms()
            .into_iter()
            .map(|c| (c, self.detach(c)))
            .collect()
    }
}
