//! The NCCL calls the glue needs, behind one small trait.
//!
//! Two implementations ship: [`RealBackend`](crate::real::RealBackend)
//! (NCCL and the CUDA driver, loaded at run time through cudarc) and
//! [`SimBackend`](crate::sim::SimBackend) (pure Rust, several simulated ranks
//! in one process, for CPU machines and CI).
//!
//! Every call that can wait for peers (a collective) or for NCCL's own
//! progress (any call on a non-blocking comm, which may answer
//! `ncclInProgress`) takes a [`Wait`]: how long the calling thread may
//! wait, and what it does at the deadline (abort the comm, or report the
//! stall and go on). The thread that made the call is the one that polls
//! (`ncclCommGetAsyncError`) and, at the deadline, aborts: see
//! `NEVER_HANG.md`.

use std::cell::Cell;
use std::fmt;
use std::time::{Duration, Instant};

/// `NCCL_WIN_COLL_SYMMETRIC`: the flag that makes a window usable by
/// symmetric collective kernels.
pub const NCCL_WIN_COLL_SYMMETRIC: i32 = 1;

/// The buffer alignment NCCL 2.28 expects for window registration.
pub const WINDOW_ALIGN: usize = 4096;

/// The allocation granularity of `ncclMemAlloc` (cuMem VMM).
pub const MEM_GRANULARITY: usize = 2 << 20;

/// The oldest NCCL the glue accepts, as `ncclGetVersion` reports it
/// (2.28.0 → 22800).
pub const MIN_NCCL_VERSION: i32 = 22800;

/// A raw communicator handle: the value of an `ncclComm_t`.
///
/// The glue never uses it as an identity (NCCL reuses the address after a
/// comm is destroyed); attaching gives a registry-owned
/// [`CommId`](segment_registry::CommId) instead.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RawComm(pub usize);

impl RawComm {
    /// Whether the handle is null.
    pub fn is_null(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Debug for RawComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawComm({:#x})", self.0)
    }
}

/// A registered window: the raw `ncclWindow_t` value and a generation.
///
/// NCCL hands out a deregistered window's handle value again, so the raw
/// value alone does not name one registration; the generation does (the
/// backend that issued the window gives each one a fresh generation).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    /// The raw handle value (never zero: a null window is "no window").
    pub raw: usize,
    /// Issue number of this registration; unique within its backend.
    pub generation: u64,
}

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Window({:#x}#{})", self.raw, self.generation)
    }
}

/// What the waiting thread did when a call's deadline passed (the answer of
/// a [`Wait`]'s deadline action).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtDeadline {
    /// The comm was aborted: the call returns [`BackendError::Timeout`] at
    /// once and touches the comm no more (NCCL freed it inside the abort).
    Aborted,
    /// Nothing may release the call (a borrowed blocking comm, or an abort
    /// hook that failed): the stall was reported and the call goes on
    /// waiting.
    KeepWaiting,
}

/// The deadline action of a [`Wait`]: given the time waited so far, it
/// aborts the comm (and answers [`AtDeadline::Aborted`]) or reports the
/// stall (and answers [`AtDeadline::KeepWaiting`]).
pub type DeadlineAction<'a> = &'a dyn Fn(Duration) -> AtDeadline;

/// How the calling thread waits for one NCCL call that may not complete at
/// once: its deadline, measured from the moment the `Wait` was made, and
/// the action to run once the deadline has passed. A backend polls the
/// call's progress (`ncclCommGetAsyncError` on a non-blocking comm) and
/// asks [`check`](Self::check) between polls; the action runs at most
/// once, on the calling thread, inside the call (so an out-pointer NCCL
/// still holds stays valid until the abort has returned).
///
/// A call on a *blocking* comm cannot be polled: it returns when NCCL
/// does, and its `Wait` is never asked. The allocator's watchdog reports
/// such a call when it outlives its deadline.
pub struct Wait<'a> {
    started: Instant,
    deadline: Option<Duration>,
    action: Option<DeadlineAction<'a>>,
    fired: Cell<Option<AtDeadline>>,
}

impl fmt::Debug for Wait<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wait")
            .field("deadline", &self.deadline)
            .field("waited", &self.waited())
            .field("fired", &self.fired.get())
            .finish()
    }
}

impl Wait<'static> {
    /// No deadline: the call waits as long as NCCL takes.
    pub fn unbounded() -> Self {
        Wait {
            started: Instant::now(),
            deadline: None,
            action: None,
            fired: Cell::new(None),
        }
    }

    /// A deadline whose action aborts nothing: at the deadline the call
    /// ends with [`BackendError::Timeout`] as if it had been aborted. Only
    /// for calls whose backend cleans up itself (a comm split, whose
    /// half-made child the backend aborts) and for tests.
    pub fn give_up_after(deadline: Duration) -> Self {
        Wait {
            started: Instant::now(),
            deadline: Some(deadline),
            action: None,
            fired: Cell::new(None),
        }
    }
}

impl<'a> Wait<'a> {
    /// A wait that runs `action` once `deadline` has passed (measured from
    /// now).
    pub fn new(deadline: Duration, action: DeadlineAction<'a>) -> Self {
        Wait {
            started: Instant::now(),
            deadline: Some(deadline),
            action: Some(action),
            fired: Cell::new(None),
        }
    }

    /// The deadline, if any.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// Time since the wait was made.
    pub fn waited(&self) -> Duration {
        self.started.elapsed()
    }

    /// Time left before the deadline (`None`: no deadline; zero once it
    /// has passed).
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_sub(self.waited()))
    }

    /// Never longer than the time left before the deadline (a poller that
    /// slept `nap` must not overshoot it).
    fn clip(&self, nap: Duration) -> Duration {
        match self.remaining() {
            Some(r) if !r.is_zero() => r.min(nap),
            _ => nap,
        }
    }

    /// `None` before the deadline (or without one). At the first check past
    /// it, runs the action (once) and returns its answer; later checks
    /// return the same answer without running it again. A wait without an
    /// action answers [`AtDeadline::Aborted`] (see
    /// [`give_up_after`](Wait::give_up_after)).
    pub fn check(&self) -> Option<AtDeadline> {
        if let Some(done) = self.fired.get() {
            return Some(done);
        }
        let deadline = self.deadline?;
        let waited = self.waited();
        if waited < deadline {
            return None;
        }
        let answer = self.action.map_or(AtDeadline::Aborted, |a| a(waited));
        self.fired.set(Some(answer));
        Some(answer)
    }

    /// Whether the deadline action ran and aborted the comm.
    pub fn aborted(&self) -> bool {
        self.fired.get() == Some(AtDeadline::Aborted)
    }

    /// The [`BackendError::Timeout`] of `call` on `comm` after this wait.
    pub fn timeout(&self, call: &'static str, comm: RawComm) -> BackendError {
        BackendError::Timeout {
            call,
            comm,
            waited: self.waited(),
        }
    }
}

/// The state `ncclCommGetAsyncError` reports for a comm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommProgress {
    /// No call in progress and no error (`ncclSuccess`).
    Ready,
    /// A call on the non-blocking comm is still in progress
    /// (`ncclInProgress`).
    InProgress,
}

/// The `ncclResult_t` a non-blocking call answers while it is still in
/// progress.
pub const NCCL_IN_PROGRESS: i32 = 7;

/// The reduction input of an agreement: a few `u64` words, all-reduced
/// with `max`.
pub const MAX_AGREEMENT_WORDS: usize = 16;

/// Why a backend call failed. Every variant is a typed error: no backend
/// panics on bad input or a missing library.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// A shared library could not be loaded.
    #[error("the {lib} library was not found (is it on LD_LIBRARY_PATH?)")]
    LibraryMissing {
        /// Which library ("nccl" or "cuda").
        lib: &'static str,
    },
    /// A library lacks a symbol the glue needs.
    #[error("symbol {symbol} is missing from the {lib} library")]
    SymbolMissing {
        /// Which library.
        lib: &'static str,
        /// The symbol.
        symbol: &'static str,
    },
    /// The NCCL found is older than 2.28.
    #[error("NCCL {found} is too old: symmetric windows need {required} or newer")]
    NcclTooOld {
        /// `ncclGetVersion`'s value.
        found: i32,
        /// [`MIN_NCCL_VERSION`].
        required: i32,
    },
    /// An NCCL call returned an error code.
    #[error("{call} failed with NCCL error {code}: {message}")]
    Nccl {
        /// The NCCL function.
        call: &'static str,
        /// Its `ncclResult_t`.
        code: i32,
        /// `ncclGetErrorString` (and `ncclGetLastError` where available).
        message: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver call {call} failed: {message}")]
    Driver {
        /// What was being done.
        call: &'static str,
        /// The driver's error.
        message: String,
    },
    /// A null communicator was passed (NCCL 2.28 segfaults on it).
    #[error("{call} called with a null communicator")]
    NullComm {
        /// The call refused.
        call: &'static str,
    },
    /// A null pointer or a zero size was passed where memory was expected.
    #[error("{call}: invalid argument: {reason}")]
    InvalidArgument {
        /// The call refused.
        call: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The simulated backend refused a call that real NCCL would fail, hang
    /// or crash on (the violation is also recorded by the simulator).
    #[error("simulated {call} refused: {reason}")]
    SimRejected {
        /// The call refused.
        call: &'static str,
        /// Why.
        reason: String,
    },
    /// A fault injected into the simulated backend.
    #[error("injected fault: {call} #{nth} on rank {rank} fails")]
    Injected {
        /// The failing call.
        call: &'static str,
        /// Its number on that rank since the fault was armed (1-based).
        nth: u64,
        /// The simulated rank.
        rank: usize,
    },
    /// The call did not complete by its deadline, and the comm was aborted
    /// (by the calling thread, or through its owner's abort hook): the
    /// comm is gone.
    #[error("{call} on {comm:?} did not complete in {waited:?}: the comm was aborted")]
    Timeout {
        /// The call.
        call: &'static str,
        /// The comm it was made on.
        comm: RawComm,
        /// How long the calling thread waited.
        waited: Duration,
    },
    /// The comm was aborted (by this rank, before or during the call).
    #[error("{call} on {comm:?}: the comm was aborted")]
    Aborted {
        /// The call.
        call: &'static str,
        /// The comm.
        comm: RawComm,
    },
    /// The backend does not implement the call.
    #[error("{call} is not supported by the {backend} backend")]
    Unsupported {
        /// The call.
        call: &'static str,
        /// The backend's name.
        backend: &'static str,
    },
}

/// The NCCL calls the allocator makes. Implementations are thread-safe; the
/// allocator itself guarantees at most one call in flight per comm (NCCL is
/// not thread-safe on one comm).
///
/// The calls behind [`Wait`]s handle `ncclInProgress` (a non-blocking
/// comm): they poll the comm from the calling thread until the call
/// completes, and ask the `Wait` between polls. The calls added for
/// checked passes (split, all-reduce, abort, async errors) have default
/// bodies that answer [`BackendError::Unsupported`], so a backend written
/// before them still serves unchecked comms.
pub trait Backend: Send + Sync {
    /// A short name for logs ("nccl", "sim").
    fn name(&self) -> &'static str;

    /// `ncclGetVersion` (e.g. 22809 for 2.28.9). From 2.30 ranks may
    /// register different sizes in one collective registration.
    fn nccl_version(&self) -> i32 {
        MIN_NCCL_VERSION
    }

    /// `ncclMemAlloc` on `device`: returns the device pointer.
    fn mem_alloc(&self, size: usize, device: i32) -> Result<usize, BackendError>;

    /// `ncclMemFree`. Only called after every window that covers the
    /// memory was deregistered.
    fn mem_free(&self, ptr: usize) -> Result<(), BackendError>;

    /// `ncclCommWindowRegister` (collective), waiting as `wait` says.
    /// `Ok(None)`: NCCL returned a null window (no symmetric support),
    /// which counts as registered without a window. If `wait`'s action
    /// aborted the comm, [`BackendError::Timeout`].
    fn comm_window_register_within(
        &self,
        comm: RawComm,
        ptr: usize,
        size: usize,
        flags: i32,
        wait: &Wait<'_>,
    ) -> Result<Option<Window>, BackendError>;

    /// `ncclCommWindowDeregister` (local), waiting as `wait` says (a
    /// non-blocking comm may answer `ncclInProgress`).
    fn comm_window_deregister_within(
        &self,
        comm: RawComm,
        window: Window,
        wait: &Wait<'_>,
    ) -> Result<(), BackendError>;

    /// [`comm_window_register_within`](Self::comm_window_register_within)
    /// with no deadline.
    fn comm_window_register(
        &self,
        comm: RawComm,
        ptr: usize,
        size: usize,
        flags: i32,
    ) -> Result<Option<Window>, BackendError> {
        self.comm_window_register_within(comm, ptr, size, flags, &Wait::unbounded())
    }

    /// [`comm_window_deregister_within`](Self::comm_window_deregister_within)
    /// with no deadline.
    fn comm_window_deregister(&self, comm: RawComm, window: Window) -> Result<(), BackendError> {
        self.comm_window_deregister_within(comm, window, &Wait::unbounded())
    }

    /// `ncclCommSplit(parent, color 0, key = this rank)` with a
    /// non-blocking config (`blocking = 0`): a new comm over the same
    /// ranks, owned by the caller. Collective on `parent`: every rank calls
    /// it at the same program point. The new comm is polled until it is
    /// ready; if `wait`'s deadline passes first, the backend aborts the
    /// half-made child itself (it is the caller's own) and returns
    /// [`BackendError::Timeout`]; `wait`'s action is not run (the parent is
    /// not the caller's to abort).
    fn comm_split(&self, parent: RawComm, wait: &Wait<'_>) -> Result<RawComm, BackendError> {
        let _ = (parent, wait);
        Err(self.unsupported("ncclCommSplit"))
    }

    /// `ncclCommGetAsyncError`: whether a call on the comm is still in
    /// progress; an error the comm met asynchronously is an `Err`.
    fn comm_async_error(&self, comm: RawComm) -> Result<CommProgress, BackendError> {
        let _ = comm;
        Err(self.unsupported("ncclCommGetAsyncError"))
    }

    /// `ncclCommAbort`: ends every call in flight on the comm and frees it,
    /// its windows included. The handle must not be used afterwards (not
    /// even to deregister a window: NCCL freed them).
    fn comm_abort(&self, comm: RawComm) -> Result<(), BackendError> {
        let _ = comm;
        Err(self.unsupported("ncclCommAbort"))
    }

    /// Destroys a comm the glue made (the private agreement comm):
    /// `ncclCommFinalize`, polled as `wait` says, then `ncclCommDestroy`.
    /// At the deadline the backend aborts the comm instead and returns
    /// [`BackendError::Timeout`].
    fn comm_release(&self, comm: RawComm, wait: &Wait<'_>) -> Result<(), BackendError> {
        let _ = (comm, wait);
        Err(self.unsupported("ncclCommDestroy"))
    }

    /// Sets up what [`all_reduce_max_u64`](Self::all_reduce_max_u64) needs
    /// on `comm` (a device buffer and a stream on the comm's device), so
    /// that the agreement itself allocates nothing.
    fn all_reduce_setup(&self, comm: RawComm) -> Result<(), BackendError> {
        let _ = comm;
        Err(self.unsupported("ncclAllReduce"))
    }

    /// `ncclAllReduce(words, words, n, ncclUint64, ncclMax, comm)` in
    /// place (collective), waited for as `wait` says: the call, then the
    /// stream. At most [`MAX_AGREEMENT_WORDS`] words;
    /// [`all_reduce_setup`](Self::all_reduce_setup) first.
    fn all_reduce_max_u64(
        &self,
        comm: RawComm,
        words: &mut [u64],
        wait: &Wait<'_>,
    ) -> Result<(), BackendError> {
        let _ = (comm, words, wait);
        Err(self.unsupported("ncclAllReduce"))
    }

    /// Frees what [`all_reduce_setup`](Self::all_reduce_setup) made for
    /// `comm` (before the comm is destroyed or right after it is aborted).
    fn all_reduce_teardown(&self, comm: RawComm) {
        let _ = comm;
    }

    /// The [`BackendError::Unsupported`] of `call` on this backend.
    fn unsupported(&self, call: &'static str) -> BackendError {
        BackendError::Unsupported {
            call,
            backend: self.name(),
        }
    }
}

/// `Backend` for smart pointers to a backend: every call forwards.
macro_rules! forward_backend {
    ($($ptr:ident)::+) => {
        impl<B: Backend + ?Sized> Backend for $($ptr)::+<B> {
            fn name(&self) -> &'static str {
                (**self).name()
            }
            fn nccl_version(&self) -> i32 {
                (**self).nccl_version()
            }
            fn mem_alloc(&self, size: usize, device: i32) -> Result<usize, BackendError> {
                (**self).mem_alloc(size, device)
            }
            fn mem_free(&self, ptr: usize) -> Result<(), BackendError> {
                (**self).mem_free(ptr)
            }
            fn comm_window_register_within(
                &self,
                comm: RawComm,
                ptr: usize,
                size: usize,
                flags: i32,
                wait: &Wait<'_>,
            ) -> Result<Option<Window>, BackendError> {
                (**self).comm_window_register_within(comm, ptr, size, flags, wait)
            }
            fn comm_window_deregister_within(
                &self,
                comm: RawComm,
                window: Window,
                wait: &Wait<'_>,
            ) -> Result<(), BackendError> {
                (**self).comm_window_deregister_within(comm, window, wait)
            }
            fn comm_split(&self, parent: RawComm, wait: &Wait<'_>) -> Result<RawComm, BackendError> {
                (**self).comm_split(parent, wait)
            }
            fn comm_async_error(&self, comm: RawComm) -> Result<CommProgress, BackendError> {
                (**self).comm_async_error(comm)
            }
            fn comm_abort(&self, comm: RawComm) -> Result<(), BackendError> {
                (**self).comm_abort(comm)
            }
            fn comm_release(&self, comm: RawComm, wait: &Wait<'_>) -> Result<(), BackendError> {
                (**self).comm_release(comm, wait)
            }
            fn all_reduce_setup(&self, comm: RawComm) -> Result<(), BackendError> {
                (**self).all_reduce_setup(comm)
            }
            fn all_reduce_max_u64(
                &self,
                comm: RawComm,
                words: &mut [u64],
                wait: &Wait<'_>,
            ) -> Result<(), BackendError> {
                (**self).all_reduce_max_u64(comm, words, wait)
            }
            fn all_reduce_teardown(&self, comm: RawComm) {
                (**self).all_reduce_teardown(comm)
            }
        }
    };
}

forward_backend!(Box);
forward_backend!(std::sync::Arc);

/// The pause between two polls of one call: a few yields first (a
/// one-rank all-reduce or a registration on an idle GPU is done within
/// microseconds, and a sleep would cost more than the call), then sleeps
/// that double from 1 µs up to [`Backoff::MAX_NAP`], never past the
/// deadline. One per poll loop.
#[derive(Debug, Default)]
pub struct Backoff {
    polls: u32,
}

impl Backoff {
    /// Polls answered by a yield before the first sleep.
    const YIELDS: u32 = 64;
    /// The longest sleep between two polls.
    pub const MAX_NAP: Duration = Duration::from_micros(200);

    /// A fresh backoff, for a new call.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits before the next poll of `wait`'s call.
    pub fn pause(&mut self, wait: &Wait<'_>) {
        match self.next_nap(wait) {
            None => std::thread::yield_now(),
            Some(nap) => std::thread::sleep(nap),
        }
    }

    /// The pause before the next poll: `None` for a yield, else the sleep.
    fn next_nap(&mut self, wait: &Wait<'_>) -> Option<Duration> {
        self.polls = self.polls.saturating_add(1);
        if self.polls <= Self::YIELDS {
            return None;
        }
        let doublings = (self.polls - Self::YIELDS).min(8);
        let nap = Duration::from_micros(1u64 << doublings).min(Self::MAX_NAP);
        Some(wait.clip(nap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A poller's nap never runs past the deadline, and is left alone where
    /// there is no deadline or it has passed (the next check fires then).
    #[test]
    fn a_nap_is_clipped_to_the_time_left() {
        let nap = Duration::from_secs(10);
        let w = Wait::give_up_after(Duration::from_secs(1));
        let clipped = w.clip(nap);
        assert!(
            !clipped.is_zero() && clipped <= Duration::from_secs(1),
            "{clipped:?}"
        );
        assert_eq!(w.clip(Duration::from_micros(5)), Duration::from_micros(5));
        assert_eq!(Wait::unbounded().clip(nap), nap);
        assert_eq!(Wait::give_up_after(Duration::ZERO).clip(nap), nap);
    }

    /// 64 yields, then sleeps of 2, 4, ... µs doubling up to 200 µs, and
    /// no sleep longer than the time left.
    #[test]
    fn the_backoff_yields_then_doubles_its_naps_up_to_the_cap() {
        let mut b = Backoff::new();
        let hour = Wait::give_up_after(Duration::from_secs(3600));
        let naps: Vec<_> = (0..80).map(|_| b.next_nap(&hour)).collect();
        assert!(naps[..64].iter().all(Option::is_none), "{naps:?}");
        let us = |n| Some(Duration::from_micros(n));
        let mut doubling: Vec<_> = [2, 4, 8, 16, 32, 64, 128].map(us).to_vec();
        doubling.resize(16, us(200));
        assert_eq!(naps[64..], doubling);
        let soon = Wait::give_up_after(Duration::from_micros(100));
        let clipped = b.next_nap(&soon).unwrap();
        assert!(clipped <= Duration::from_micros(100), "{clipped:?}");
    }
}
