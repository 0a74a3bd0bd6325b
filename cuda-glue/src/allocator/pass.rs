//! Registration passes: every live segment a comm has not seen, registered
//! collectively through the comm's gate, in track order; and what a pass
//! (or a detach) hands back.

use std::sync::atomic::Ordering;
use std::sync::{MutexGuard, TryLockError};

use segment_registry::{
    CommError, CommId, Hold, PassError as RegPassError, PassFailure, PassReport, Segment,
};

use super::comm::{CommEntry, ABORTED, ACTIVE, FAILED};
use super::deadline::comm_gone;
use super::free::Deferred;
use super::Allocator;
use crate::backend::{Backend, BackendError, RawComm, Window, NCCL_WIN_COLL_SYMMETRIC};
use crate::error::RegisterError;
use crate::stats::bump;
use crate::util::lock;

const REGISTER: &str = "ncclCommWindowRegister";
pub(super) const DEREGISTER: &str = "ncclCommWindowDeregister";

/// What a registration pass did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassSummary {
    /// The comm.
    pub comm: CommId,
    /// Segments registered, in the order of the (collective) calls.
    pub registered: Vec<Segment>,
    /// Of those, registrations that returned a window.
    pub windows: usize,
    /// Of those, registrations that returned a null window (no symmetric
    /// support): registered, nothing to deregister.
    pub null_windows: usize,
    /// Windows of segments freed while the pass held them, deregistered by
    /// the pass.
    pub handed_back: usize,
}

impl PassSummary {
    /// A pass that registered nothing.
    fn empty(comm: CommId) -> Self {
        PassSummary {
            comm,
            registered: Vec::new(),
            windows: 0,
            null_windows: 0,
            handed_back: 0,
        }
    }
}

/// Registrations of one pass that returned a window, and a null one.
#[derive(Default)]
struct Tally {
    windows: usize,
    nulls: usize,
}

impl<B: Backend> Allocator<B> {
    /// Runs a registration pass for `comm`: registers (collectively, flag
    /// `NCCL_WIN_COLL_SYMMETRIC`) every live segment it has not seen, in
    /// track order. Segments freed while the pass holds them are still
    /// registered, then deregistered and freed by the pass.
    ///
    /// On a checked comm the pass first agrees with every rank on a digest
    /// of what it would register (also when nothing is pending), over the
    /// comm's private agreement comm, and registers only if every rank's
    /// digest is the same: else [`RegisterError::Diverged`] on every rank,
    /// nothing registered, the comm healthy. A checked pass on a failed
    /// comm abstains (its peers get `Diverged` at once) and returns
    /// [`RegisterError::Failed`].
    ///
    /// Call it on the thread that issues the comm's collectives, at the
    /// same program point on every rank.
    ///
    /// A failed registration marks the comm failed: this pass and every
    /// later one return an error, and only [`detach`](Self::detach) is
    /// allowed. A second pass on the same comm meanwhile gets
    /// [`RegisterError::Busy`].
    pub fn register(&self, comm: CommId) -> Result<PassSummary, RegisterError> {
        let entry = self.entry(comm).ok_or(RegisterError::NotAttached(comm))?;
        let _pass = claim_pass(&entry).map_err(|e| self.refused(&entry, e))?;
        bump(&self.counters.passes);
        self.retry_stuck(&entry);
        let mut tally = Tally::default();
        let result = match &entry.agreement {
            None => self.registry.register_pending(comm, |raw, seg| {
                self.register_one(&entry, *raw, *seg, &mut tally)
            }),
            Some(a) => {
                if self.faults.skip_agree_when_empty && self.registry.pending(comm) == Ok(0) {
                    // The broken variant: a local shortcut the peers never see.
                    return Ok(PassSummary::empty(comm));
                }
                self.registry.register_pending_checked(
                    comm,
                    |_, d| self.agree(&entry, a, d),
                    |raw, seg| self.register_one(&entry, *raw, *seg, &mut tally),
                )
            }
        };
        let (report, error) = match result {
            Ok(report) => (report, None),
            Err(PassFailure { error, report }) => (report, Some(error)),
        };
        self.record_tally(&entry, &tally);
        let summary = PassSummary {
            comm,
            registered: report.registered.clone(),
            windows: tally.windows,
            null_windows: tally.nulls,
            handed_back: report.handed_back.len(),
        };
        self.settle(&entry, report);
        let result = match error {
            None => Ok(summary),
            Some(e) => Err(self.pass_error(&entry, e)),
        };
        if entry.state() == ABORTED {
            // Aborted during the pass: its agreement comm goes too (we
            // hold the pass lock, the only user of it).
            if let Some(a) = &entry.agreement {
                self.drop_agreement(a);
            }
        }
        result
    }

    /// The error of a pass on an aborted comm.
    pub(super) fn aborted_error(&self, entry: &CommEntry) -> RegisterError {
        RegisterError::Aborted {
            comm: entry.id,
            reason: lock(&entry.failure).clone().unwrap_or_default(),
        }
    }

    /// A pass refused before it began (`claim_pass` failed, the pass lock
    /// held): a checked comm that failed abstains, so that its peers fail
    /// at once instead of at their deadline; an aborted one's agreement
    /// comm goes with it.
    fn refused(&self, entry: &CommEntry, (error, pass): Refusal<'_>) -> RegisterError {
        if let (RegisterError::Aborted { .. }, Some(_held)) = (&error, &pass) {
            if let Some(a) = &entry.agreement {
                self.drop_agreement(a);
            }
        }
        if let (RegisterError::Failed { .. }, Some(_held)) = (&error, pass) {
            let live = entry.agreement.as_ref().is_some_and(|a| a.lost().is_none());
            if live && !self.faults.no_abstain_when_failed {
                let _ = self.abstain_locked(entry);
            }
        }
        error
    }

    /// One collective `ncclCommWindowRegister`, through the comm's gate.
    fn register_one(
        &self,
        entry: &CommEntry,
        raw: RawComm,
        seg: Segment,
        tally: &mut Tally,
    ) -> Result<Option<Window>, BackendError> {
        let r = entry.gate.call(
            || {
                if entry.state() == ABORTED {
                    // A deregistration just before ended at its deadline.
                    return Err(BackendError::Aborted {
                        call: REGISTER,
                        comm: raw,
                    });
                }
                self.within(entry, REGISTER, |wait| {
                    self.backend.comm_window_register_within(
                        raw,
                        seg.addr,
                        seg.len,
                        NCCL_WIN_COLL_SYMMETRIC,
                        wait,
                    )
                })
            },
            |j| self.run_deferred(entry, j),
        );
        match &r {
            Ok(Some(_)) => tally.windows += 1,
            Ok(None) => tally.nulls += 1,
            Err(_) => {}
        }
        r
    }

    /// Counts a pass's registrations, and what they say about the comm's
    /// symmetric support.
    fn record_tally(&self, entry: &CommEntry, tally: &Tally) {
        self.counters
            .windows_registered
            .fetch_add(tally.windows as u64, Ordering::Relaxed); // Relaxed: statistics.
        self.counters
            .null_windows
            .fetch_add(tally.nulls as u64, Ordering::Relaxed); // Relaxed: statistics.
        if tally.windows > 0 {
            // Relaxed: a diagnostic flag.
            entry.saw_window.store(true, Ordering::Relaxed);
        }
        if tally.nulls > 0 {
            // Relaxed: a diagnostic flag.
            entry.saw_null_window.store(true, Ordering::Relaxed);
        }
    }

    /// The error of a pass that stopped; a failed registration marks the
    /// comm failed.
    pub(super) fn pass_error(
        &self,
        entry: &CommEntry,
        error: RegPassError<BackendError>,
    ) -> RegisterError {
        match error {
            RegPassError::Callback {
                error: BackendError::Timeout { call, waited, .. },
                ..
            } => {
                bump(&self.counters.register_failures);
                RegisterError::Timeout {
                    comm: entry.id,
                    call,
                    waited,
                }
            }
            // A call that reached its deadline aborted the comm during the
            // pass (a deregistration the pass ran for a free, or a free's
            // own): the registry forgot the comm, and a registration after
            // the abort was refused. The comm is gone, not unknown.
            RegPassError::Callback { .. } | RegPassError::Forgotten(_)
                if entry.state() == ABORTED =>
            {
                if matches!(error, RegPassError::Callback { .. }) {
                    bump(&self.counters.register_failures);
                }
                self.aborted_error(entry)
            }
            RegPassError::Callback { segment, error } => {
                bump(&self.counters.register_failures);
                entry.fail(format!("registering segment {:#x}: {error}", segment.addr));
                RegisterError::Register {
                    comm: entry.id,
                    segment,
                    source: error,
                }
            }
            RegPassError::Comm(CommError::Busy(c)) => RegisterError::Busy(c),
            RegPassError::Comm(CommError::NotAttached(c)) | RegPassError::Forgotten(c) => {
                RegisterError::NotAttached(c)
            }
            RegPassError::Diverged(d) => {
                bump(&self.counters.diverged);
                RegisterError::Diverged(d)
            }
            RegPassError::Agreement { comm, error } => {
                bump(&self.counters.agreement_failures);
                entry.fail(format!("the agreement before registering failed: {error}"));
                RegisterError::Agreement {
                    comm,
                    source: error,
                }
            }
        }
    }

    /// Acts on a pass's report: deregisters hand-backs (then releases
    /// their holds) and counts down segments whose last hold the pass
    /// released.
    pub(super) fn settle(&self, entry: &CommEntry, report: PassReport<'_, Window>) {
        for hb in report.handed_back {
            bump(&self.counters.handed_back);
            self.hand_back(entry, hb.segment, hb.window, hb.hold);
        }
        for seg in report.free_now {
            self.registry_released(seg);
        }
    }

    /// Deregisters a window that comes with a registry hold (from a pass or
    /// from `forget`), then releases the hold: the memory cannot be freed
    /// before the deregistration, whoever frees it. If the deregistration
    /// fails, the window joins the segment's countdown (made here if its
    /// free has not linked one yet) and waits in `stuck` for a retry.
    pub(super) fn hand_back(
        &self,
        entry: &CommEntry,
        segment: Segment,
        window: Window,
        hold: Hold<'_, Window>,
    ) -> bool {
        let r = entry.gate.call(
            || {
                if entry.state() == ABORTED {
                    return Err(BackendError::Aborted {
                        call: DEREGISTER,
                        comm: entry.raw,
                    });
                }
                self.within(entry, DEREGISTER, |wait| {
                    self.backend
                        .comm_window_deregister_within(entry.raw, window, wait)
                })
            },
            |j| self.run_deferred(entry, j),
        );
        let e = match r {
            Ok(()) => {
                bump(&self.counters.windows_deregistered);
                if hold.release() {
                    self.registry_released(segment);
                }
                return true;
            }
            Err(e) if comm_gone(&e) => {
                // NCCL freed the window inside the comm's abort.
                bump(&self.counters.windows_dropped);
                if hold.release() {
                    self.registry_released(segment);
                }
                return false;
            }
            Err(e) => e,
        };
        bump(&self.counters.deregister_failures);
        self.note(format!(
            "deregistering {window:?} of segment {:#x} on {}: {e}",
            segment.addr, entry.id
        ));
        // Before the hold goes: whoever releases the last hold (or the
        // segment's free) finds the record and counts the registry's share.
        let (pending, _) = self.join_countdown(segment, 1, true);
        if hold.release() {
            self.registry_released(segment);
        }
        lock(&entry.stuck).push(Deferred {
            segment,
            window,
            free: Some(pending),
        });
        false
    }

    /// The registry's last hold on a freed segment is gone.
    pub(super) fn registry_released(&self, seg: Segment) {
        let pending = lock(&self.held_frees).remove(&(seg.addr, seg.seq));
        match pending {
            Some(p) => self.count_down(&p),
            None => {
                bump(&self.counters.orphans);
                self.note(format!(
                    "segment {:#x} released with no free pending",
                    seg.addr
                ));
            }
        }
    }

    /// Runs a pass for every attached comm, in attach order (the same on
    /// every rank). A failed comm reports its error and does not stop the
    /// others.
    pub fn register_all(&self) -> Vec<(CommId, Result<PassSummary, RegisterError>)> {
        self.comms()
            .into_iter()
            .map(|c| (c, self.register(c)))
            .collect()
    }
}

/// Why [`claim_pass`] refused, with the pass lock if it was taken.
type Refusal<'a> = (RegisterError, Option<MutexGuard<'a, ()>>);

/// Takes the comm's pass lock (a second pass gets `Busy`) and checks that
/// passes are allowed.
fn claim_pass(entry: &CommEntry) -> Result<MutexGuard<'_, ()>, Refusal<'_>> {
    let pass = match entry.pass_lock.try_lock() {
        Ok(g) => g,
        Err(TryLockError::WouldBlock) => return Err((RegisterError::Busy(entry.id), None)),
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
    };
    match entry.state() {
        ACTIVE => Ok(pass),
        FAILED => Err((
            RegisterError::Failed {
                comm: entry.id,
                reason: lock(&entry.failure).clone().unwrap_or_default(),
            },
            Some(pass),
        )),
        ABORTED => Err((
            RegisterError::Aborted {
                comm: entry.id,
                reason: lock(&entry.failure).clone().unwrap_or_default(),
            },
            Some(pass),
        )),
        _ => Err((RegisterError::NotAttached(entry.id), Some(pass))),
    }
}
