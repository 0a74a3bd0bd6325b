//! Deadlines: every call the allocator makes on a comm (register,
//! deregister) runs under the comm's deadline, and what happens at the
//! deadline depends on who owns the comm (`NEVER_HANG.md`):
//!
//! * owned: the calling thread, which polls the call, aborts the comm;
//! * borrowed non-blocking: the calling thread calls the owner's hook;
//! * borrowed blocking: nothing may end the call; the watchdog reports it.
//!
//! An aborted comm is gone at once: its raw handle leaves the attach
//! index, the registry forgets it (so lookups stop answering with its
//! windows, which NCCL freed inside the abort), and every window it held
//! leaves the accounting without an NCCL call, counting down its
//! segment's free as a deregistration would.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::checked::{Agreement, CommOwner};
use super::comm::CommEntry;
use super::free::Deferred;
use super::Allocator;
use crate::backend::{AtDeadline, Backend, BackendError, Wait};
use crate::stats::bump;
use crate::util::lock;
use crate::watchdog::{self, Sink};

impl<B: Backend> Allocator<B> {
    /// Runs `call` (named `name`) on `entry`'s comm under the comm's
    /// deadline: with a [`Wait`] whose action ends it as the owner allows,
    /// and, on a borrowed blocking comm (which cannot be polled), under the
    /// watchdog's watch.
    pub(super) fn within<T>(
        &self,
        entry: &CommEntry,
        name: &'static str,
        call: impl FnOnce(&Wait<'_>) -> T,
    ) -> T {
        let action = |waited| self.at_deadline(entry, name, waited);
        let wait = self.wait(entry.deadline, &action);
        let _watch = matches!(entry.owner, CommOwner::Borrowed).then(|| {
            let what = format!("{name} on {} ({:?})", entry.id, entry.raw);
            watchdog::watch(what, entry.deadline, self.sink())
        });
        call(&wait)
    }

    /// Where the watchdog reports.
    pub(super) fn sink(&self) -> Sink {
        Sink {
            counters: self.counters.clone(),
            last_error: self.last_error.clone(),
        }
    }

    /// The deadline action of a call on `entry`'s comm (run once, by the
    /// thread polling the call, inside the call).
    fn at_deadline(&self, entry: &CommEntry, name: &'static str, waited: Duration) -> AtDeadline {
        match &entry.owner {
            // Not polled in practice (a blocking call); if NCCL answered
            // `ncclInProgress` after all, the watchdog's watch reports it.
            CommOwner::Borrowed => return AtDeadline::KeepWaiting,
            CommOwner::BorrowedNonBlocking(hook) => {
                if let Err(e) = hook(entry.raw) {
                    let what = format!(
                        "{name} on {} ({:?}), whose owner's abort hook failed ({e}),",
                        entry.id, entry.raw
                    );
                    self.sink().report(&what, waited, entry.deadline);
                    return AtDeadline::KeepWaiting;
                }
            }
            CommOwner::Owned => {
                if let Err(e) = self.backend.comm_abort(entry.raw) {
                    // The comm is unusable either way: treated as gone.
                    self.note(format!("ncclCommAbort({:?}): {e}", entry.raw));
                }
            }
        }
        bump(&self.counters.timeouts);
        self.aborted(
            entry,
            format!("{name} did not complete in {waited:.1?}: the comm was aborted"),
        );
        AtDeadline::Aborted
    }

    /// The comm was aborted: marks it, takes its handle out of the attach
    /// index, forgets it in the registry, and drops every window it held
    /// or had waiting for a retry. Runs once per comm (on the thread whose
    /// call reached the deadline; no lock of the allocator is needed but
    /// the table's read lock, which a free may hold).
    fn aborted(&self, entry: &CommEntry, reason: String) {
        if !entry.set_aborted(reason.clone()) {
            return;
        }
        bump(&self.counters.comms_aborted);
        self.note(format!("{}: {reason}", entry.id));
        self.unindex(entry);
        if let Ok(forgotten) = self.registry.forget(entry.id) {
            for hb in forgotten.windows {
                bump(&self.counters.windows_dropped);
                if hb.hold.release() {
                    self.registry_released(hb.segment);
                }
            }
            for seg in forgotten.free_now {
                self.registry_released(seg);
            }
        }
        self.drop_stuck(entry);
    }

    /// Drops the deregistrations of an aborted comm that wait for a retry.
    pub(super) fn drop_stuck(&self, entry: &CommEntry) {
        let jobs = std::mem::take(&mut *lock(&entry.stuck));
        for job in jobs {
            self.drop_deferred(job);
        }
    }

    /// A window of an aborted comm leaves the accounting without an NCCL
    /// call (NCCL freed it inside the abort): it counts down its segment's
    /// free as its deregistration would have.
    pub(super) fn drop_deferred(&self, job: Deferred) {
        bump(&self.counters.windows_dropped);
        if let Some(p) = &job.free {
            self.count_down(p);
        }
    }

    /// Takes the comm out of the raw-handle index, once (detach or abort).
    pub(super) fn unindex(&self, entry: &CommEntry) {
        // SeqCst: rare; whoever swaps it first removes the slot.
        if entry.indexed.swap(false, Ordering::SeqCst) {
            self.raw_index.remove(entry.raw, entry.id);
        }
    }

    /// Aborts the agreement comm of a comm that is gone (it is ours, and
    /// only the holder of the pass lock uses it: the caller).
    pub(super) fn drop_agreement(&self, a: &Agreement) {
        if a.lost().is_some() {
            return;
        }
        if let Err(e) = self.backend.comm_abort(a.comm) {
            self.note(format!("aborting the agreement comm {:?}: {e}", a.comm));
        }
        self.backend.all_reduce_teardown(a.comm);
        a.mark_lost("its comm was aborted".into());
    }
}

/// Whether a call's error says that its comm is gone (the call ended at
/// its deadline by an abort, or met an abort): its window, if any, is
/// dropped, not retried.
pub(super) fn comm_gone(e: &BackendError) -> bool {
    matches!(
        e,
        BackendError::Timeout { .. } | BackendError::Aborted { .. }
    )
}
