//! Checked comms: the options of an attach, the private agreement comm
//! (split from the user's comm at attach, warmed up, released at detach),
//! the agreement of a checked pass, abstaining, and the test-only switches
//! of the negative controls. The protocol is in `NEVER_HANG.md`.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use segment_registry::{CommId, Digest, DigestRange, PassFailure};

use super::comm::CommEntry;
use super::Allocator;
use crate::backend::{AtDeadline, Backend, BackendError, RawComm, Wait};
use crate::error::{AttachError, RegisterError};
use crate::util::lock;

/// The environment variable that sets the default deadline of every
/// collective call the glue makes, in milliseconds (a positive integer).
pub const DEADLINE_ENV: &str = "SEGREG_DEADLINE_MS";

/// The deadline when [`DEADLINE_ENV`] is unset or not a positive integer:
/// ten minutes, PyTorch's default for an NCCL collective.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(600);

/// The first NCCL (2.30) whose collective registration accepts different
/// sizes per rank: the agreement then compares counts only.
const NCCL_SIZES_MAY_DIFFER: i32 = 23000;

/// The deadline [`DEADLINE_ENV`] sets now, else [`DEFAULT_DEADLINE`].
pub fn deadline_from_env() -> Duration {
    std::env::var(DEADLINE_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map_or(DEFAULT_DEADLINE, Duration::from_millis)
}

/// The owner's abort of a borrowed non-blocking comm: called by the thread
/// that polls a call on the comm, at the call's deadline, with the comm's
/// raw handle. `Ok` means the comm is aborted (NCCL freed it and its
/// windows); an `Err` is reported and the call goes on waiting.
pub type AbortHook = Arc<dyn Fn(RawComm) -> Result<(), String> + Send + Sync>;

/// Who owns a comm, which says what may end one of its calls at the
/// deadline (see `NEVER_HANG.md` for the guarantee of each).
#[derive(Clone, Default)]
pub enum CommOwner {
    /// The application owns it and made it blocking (PyTorch's default).
    /// Nothing can release a thread inside a blocking call safely, so the
    /// glue never aborts it: a call past its deadline is reported by the
    /// watchdog (a log line and the `stalls` counter) and goes on.
    #[default]
    Borrowed,
    /// The application owns it and made it non-blocking, and gives the
    /// hook that aborts it. The calling thread polls each call; at the
    /// deadline it calls the hook and the comm is treated as gone
    /// ([`CommState::Aborted`](crate::CommState::Aborted)).
    BorrowedNonBlocking(AbortHook),
    /// Made non-blocking for the glue alone (for instance by
    /// [`RealBackend::comm_init_one_rank_nonblocking`](crate::real::RealBackend::comm_init_one_rank_nonblocking)
    /// or [`SimWorld::comm_create_nonblocking`](crate::sim::SimWorld::comm_create_nonblocking)):
    /// the calling thread polls each call and at the deadline aborts the
    /// comm itself (`ncclCommAbort`). The caller must not destroy an
    /// aborted comm.
    Owned,
}

impl fmt::Debug for CommOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CommOwner::Borrowed => "Borrowed",
            CommOwner::BorrowedNonBlocking(_) => "BorrowedNonBlocking(hook)",
            CommOwner::Owned => "Owned",
        })
    }
}

/// How [`Allocator::attach_with`] attaches a comm. The default is today's
/// [`attach`](Allocator::attach): unchecked, borrowed and blocking, with
/// the deadline of [`DEADLINE_ENV`].
///
/// ```
/// # #[cfg(not(feature = "loom"))] {
/// use std::time::Duration;
/// use segment_registry_nccl::AttachOptions;
///
/// let opts = AttachOptions::new().checked().deadline(Duration::from_secs(30)).owned();
/// assert!(opts.is_checked());
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct AttachOptions {
    checked: bool,
    deadline: Option<Duration>,
    pub(super) owner: CommOwner,
}

impl AttachOptions {
    /// Unchecked, borrowed and blocking, deadline from [`DEADLINE_ENV`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Checked passes: before registering, every rank's pass agrees on a
    /// digest of what it would register, over a private comm split from
    /// this one at attach (so the attach is collective). A disagreement is
    /// [`RegisterError::Diverged`] on every rank, with nothing registered.
    pub fn checked(mut self) -> Self {
        self.checked = true;
        self
    }

    /// The deadline of every collective call on the comm (registrations,
    /// the agreement, the split at attach), instead of [`DEADLINE_ENV`].
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The comm was made non-blocking for the glue, which aborts it at a
    /// deadline ([`CommOwner::Owned`]).
    pub fn owned(mut self) -> Self {
        self.owner = CommOwner::Owned;
        self
    }

    /// The application's non-blocking comm, aborted at a deadline through
    /// `hook` ([`CommOwner::BorrowedNonBlocking`]).
    pub fn borrowed_nonblocking(mut self, hook: AbortHook) -> Self {
        self.owner = CommOwner::BorrowedNonBlocking(hook);
        self
    }

    /// Whether the comm gets checked passes.
    pub fn is_checked(&self) -> bool {
        self.checked
    }

    /// The deadline the comm gets: the one set, else [`DEADLINE_ENV`]'s.
    pub fn resolved_deadline(&self) -> Duration {
        self.deadline.unwrap_or_else(deadline_from_env)
    }
}

/// The private agreement comm of a checked comm. Used only under the
/// comm's pass lock (passes, abstain, detach), never beside the user's
/// collectives: that is why it is a comm of its own.
pub(crate) struct Agreement {
    /// The comm split from the user's at attach (non-blocking, ours).
    pub(super) comm: RawComm,
    /// Why it is gone (aborted after a timeout or an error), if it is.
    lost: Mutex<Option<String>>,
}

impl Agreement {
    /// Why the agreement comm is gone, if it is.
    pub(super) fn lost(&self) -> Option<String> {
        lock(&self.lost).clone()
    }

    pub(super) fn mark_lost(&self, why: String) {
        lock(&self.lost).get_or_insert(why);
    }
}

/// Deliberately broken variants of the glue, for the negative controls of
/// the tests (each test shows its property fails with the switch on).
/// Never set outside tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestFaults {
    /// A checked pass with nothing pending returns at once without taking
    /// part in the agreement (the naive shortcut): its peers then wait.
    pub skip_agree_when_empty: bool,
    /// Every wait ignores its deadline (waits as long as NCCL takes).
    pub ignore_deadline: bool,
    /// A checked pass on a failed comm returns `Failed` without abstaining:
    /// its peers then wait for it until their deadline.
    pub no_abstain_when_failed: bool,
}

impl<B: Backend> Allocator<B> {
    /// The same allocator with the negative controls' switches set (tests
    /// only).
    pub fn with_test_faults(mut self, faults: TestFaults) -> Self {
        self.faults = faults;
        self
    }

    /// A wait of `deadline` whose action is `action`, unless the
    /// `ignore_deadline` fault is set.
    pub(super) fn wait<'a>(
        &self,
        deadline: Duration,
        action: &'a dyn Fn(Duration) -> AtDeadline,
    ) -> Wait<'a> {
        if self.faults.ignore_deadline {
            Wait::unbounded()
        } else {
            Wait::new(deadline, action)
        }
    }

    /// Splits the private agreement comm from `raw` (collective), sets up
    /// its buffer and warms the all-reduce up (the first NCCL use of a
    /// comm can block in lazy connection setup). Whatever it made is
    /// aborted if a step fails or ends at the deadline.
    pub(super) fn open_agreement(
        &self,
        raw: RawComm,
        opts: &AttachOptions,
    ) -> Result<Agreement, AttachError> {
        let deadline = opts.resolved_deadline();
        let fail = |source| AttachError::Agreement { raw, source };
        let split_wait = if self.faults.ignore_deadline {
            Wait::unbounded()
        } else {
            Wait::give_up_after(deadline)
        };
        // The split is a call on the user's comm: if that comm is blocking,
        // whether NCCL honours the child's non-blocking config is NCCL's
        // business, so the watchdog watches it too.
        let split = {
            let _watch = matches!(opts.owner, CommOwner::Borrowed).then(|| {
                let what = format!("ncclCommSplit of {raw:?} (a checked attach)");
                crate::watchdog::watch(what, deadline, self.sink())
            });
            self.backend.comm_split(raw, &split_wait)
        };
        let comm = split.map_err(fail)?;
        let agreement = Agreement {
            comm,
            lost: Mutex::new(None),
        };
        if let Err(e) = self.backend.all_reduce_setup(comm) {
            let _ = self.backend.comm_abort(comm);
            return Err(fail(e));
        }
        let mut warm = Digest::default().reduction_input();
        self.agreement_call(&agreement, deadline, &mut warm)
            .map_err(fail)?;
        Ok(agreement)
    }

    /// Releases the agreement comm at detach (`ncclCommFinalize` +
    /// `ncclCommDestroy`, aborted at the deadline); a failure is noted.
    pub(super) fn close_agreement(&self, a: &Agreement, deadline: Duration) {
        if a.lost().is_some() {
            return; // aborted already
        }
        self.backend.all_reduce_teardown(a.comm);
        let wait = Wait::give_up_after(deadline);
        if let Err(e) = self.backend.comm_release(a.comm, &wait) {
            self.note(format!("releasing the agreement comm {:?}: {e}", a.comm));
        }
        a.mark_lost("released at detach".into());
    }

    /// One all-reduce of `words` on the agreement comm, ended at
    /// `deadline` by an abort of that comm (it is ours). On any error the
    /// agreement comm is aborted (if the deadline did not do it) and gone.
    fn agreement_call(
        &self,
        a: &Agreement,
        deadline: Duration,
        words: &mut [u64],
    ) -> Result<(), BackendError> {
        let abort = |_| {
            if let Err(e) = self.backend.comm_abort(a.comm) {
                self.note(format!("aborting the agreement comm {:?}: {e}", a.comm));
            }
            crate::stats::bump(&self.counters.timeouts);
            AtDeadline::Aborted
        };
        let wait = self.wait(deadline, &abort);
        let r = self.backend.all_reduce_max_u64(a.comm, words, &wait);
        if let Err(e) = &r {
            if !wait.aborted() {
                let _ = self.backend.comm_abort(a.comm);
            }
            self.backend.all_reduce_teardown(a.comm);
            a.mark_lost(e.to_string());
        }
        r
    }

    /// A checked pass's agreement: the group's range of `digest` (without
    /// sizes on NCCL 2.30+, which accepts different sizes per rank).
    pub(super) fn agree(
        &self,
        entry: &CommEntry,
        a: &Agreement,
        digest: &Digest,
    ) -> Result<DigestRange, BackendError> {
        let d = if self.backend.nccl_version() >= NCCL_SIZES_MAY_DIFFER {
            digest.without_sizes()
        } else {
            *digest
        };
        let mut words = d.reduction_input();
        crate::stats::bump(&self.counters.agreements);
        self.agreement_call(a, entry.deadline, &mut words)?;
        Ok(Digest::range_from_reduced(words))
    }

    /// The private agreement comm of a checked comm (for diagnostics and
    /// tests: the glue alone makes calls on it).
    pub fn agreement_comm(&self, comm: CommId) -> Option<RawComm> {
        self.entry(comm)?.agreement.as_ref().map(|a| a.comm)
    }

    /// Takes part in the comm's next checked pass without registering (this
    /// rank cannot register now): every rank's pass then ends with
    /// [`RegisterError::Diverged`] at once instead of waiting for this one.
    /// Call it where the pass would be called. Returns that `Diverged` (the
    /// expected outcome), or why the rank could not take part
    /// ([`RegisterError::NotChecked`], `Busy`, `NotAttached`, a failed
    /// agreement).
    pub fn abstain(&self, comm: CommId) -> RegisterError {
        let Some(entry) = self.entry(comm) else {
            return RegisterError::NotAttached(comm);
        };
        if entry.agreement.is_none() {
            return RegisterError::NotChecked(comm);
        }
        let _pass = match entry.pass_lock.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::WouldBlock) => return RegisterError::Busy(comm),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        self.abstain_locked(&entry)
    }

    /// [`abstain`](Self::abstain) with the pass lock held.
    pub(super) fn abstain_locked(&self, entry: &CommEntry) -> RegisterError {
        let Some(a) = entry.agreement.as_ref() else {
            return RegisterError::NotChecked(entry.id);
        };
        if let Some(why) = a.lost() {
            return RegisterError::Failed {
                comm: entry.id,
                reason: format!("its agreement comm is gone ({why})"),
            };
        }
        let PassFailure { error, report } = self
            .registry
            .abstain_checked(entry.id, |_, d| self.agree(entry, a, d));
        self.settle(entry, report);
        self.pass_error(entry, error)
    }
}
