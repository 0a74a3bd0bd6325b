//! A simulated NCCL for CPU machines and CI: several ranks of several comms
//! in one process, with NCCL's rules checked and every breach recorded as a
//! [`Violation`] (collected, queryable), plus fault injection.
//!
//! A [`SimWorld`] holds `n` simulated ranks (processes). Each rank has its
//! own fake device address space (addresses differ between ranks, as in a
//! real job; the memory is never dereferenceable); [`SimWorld::rank`] gives
//! the [`Backend`](crate::Backend) of one rank, to build that rank's allocator on.
//! [`SimWorld::comm_create`] makes a comm over some ranks and returns one raw
//! handle per member; raw handle values, like `ncclComm_t` addresses and
//! window handles, are reused after destroy/deregister.
//!
//! Rules checked (see [`Violation`]): collective registration must match in
//! order (which buffer), size and count across the members of a comm; one
//! call at a time per comm and rank (a destroy included: a call whose comm
//! is destroyed under it issues nothing); no memory freed while a window or an
//! in-flight registration covers it; no duplicate registration; deregister
//! once, on the right comm; 4096-byte alignment; no null comm.
//!
//! Registration is not a blocking rendezvous here: each rank's call returns
//! at once and the collective check compares the ranks' logs position by
//! position. A test can park a call with [`SimWorld::set_hook`], which runs
//! while the call is in flight (after its checks, before its outcome).
//!
//! The all-reduce and the comm split *are* blocking rendezvous
//! (`rendezvous.rs`): ranks on different threads meet in them, in the
//! order of their calls, and an abort of a member ends its call. Comms are
//! blocking ([`SimWorld::comm_create`]) or non-blocking
//! ([`SimWorld::comm_create_nonblocking`], and every split child): a call
//! on a non-blocking comm honours its [`Wait`](crate::Wait)'s deadline, a
//! call on a blocking one cannot be released. Faults: a call that fails
//! ([`SimWorld::fail_nth`]), a call that never completes until its comm is
//! aborted ([`SimWorld::stall_next`]); [`SimWorld::release_all`] ends every
//! waiting call (the tests' escape hatch).
//!
//! Which buffer a registration names is compared across ranks by a
//! [`BufferId`]: the allocation site label the allocating thread set with
//! [`set_alloc_site`] and the allocation's number among that site's on its
//! rank.
//!
//! The world's state (`world.rs`) is one value behind one mutex; each
//! call's checks and updates are its methods, by concern: `memory.rs`,
//! `comms.rs`, `windows.rs` (registration), `rules.rs` (buffer and
//! collective checks) and `faults.rs`.

mod backend;
mod calls;
mod comms;
mod faults;
mod memory;
mod rendezvous;
mod rules;
mod site;
mod violation;
mod windows;
mod world;

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, RwLock};

pub use backend::SimBackend;
pub use calls::{SimCall, SimHook, SimOp, TraceEvent};
pub use site::{set_alloc_site, BufferId};
pub use violation::{Mismatch, Violation};

use crate::backend::{BackendError, RawComm};
use crate::util::{lock, read, write};
use world::WorldState;

/// Figures of a simulated world.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Allocations not freed, all ranks.
    pub live_allocs: usize,
    /// Windows registered and not deregistered (nor dropped by a destroy).
    pub live_windows: usize,
    /// Windows issued so far.
    pub windows_issued: u64,
    /// Windows deregistered so far.
    pub windows_deregistered: u64,
    /// Successful `ncclMemAlloc`s.
    pub allocs: u64,
    /// Successful `ncclMemFree`s.
    pub frees: u64,
    /// Register calls (including failed ones).
    pub registers: u64,
    /// Deregister calls (including failed ones).
    pub deregisters: u64,
    /// Comms live now (at least one member not destroyed).
    pub live_comms: usize,
    /// Windows freed by `ncclCommAbort` of their comm (never to be
    /// deregistered).
    pub windows_aborted: u64,
    /// `ncclCommAbort` calls.
    pub aborts: u64,
    /// All-reduces completed (each counted once, for all members).
    pub all_reduces: u64,
    /// Collective meetings (all-reduces, splits) joined and not yet taken
    /// by every member: the simulator's own memory, flat over a long run.
    pub open_meetings: usize,
}

/// A simulated job of several ranks. Share it in an [`Arc`].
pub struct SimWorld {
    nranks: usize,
    state: Mutex<WorldState>,
    /// Signalled whenever a waiting call may have something to see (a
    /// meeting completed, an abort, a release).
    changed: Condvar,
    hook: RwLock<Option<SimHook>>,
}

impl fmt::Debug for SimWorld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimWorld")
            .field("nranks", &self.nranks)
            .finish_non_exhaustive()
    }
}

/// A call the simulator refuses, with why.
fn rejected(call: &'static str, reason: impl Into<String>) -> BackendError {
    BackendError::SimRejected {
        call,
        reason: reason.into(),
    }
}

/// The outcome of a call whose comm was destroyed while it was in flight
/// (the destroy reported it as a concurrent call).
fn destroyed_in_flight(call: &'static str, comm: RawComm) -> BackendError {
    rejected(
        call,
        format!("{comm:?} was destroyed while the call was in flight"),
    )
}

impl SimWorld {
    /// A world of `nranks` simulated ranks (at least one).
    pub fn new(nranks: usize) -> Arc<Self> {
        let nranks = nranks.max(1);
        Arc::new(SimWorld {
            nranks,
            state: Mutex::new(WorldState::new(nranks, memory::rank_base)),
            changed: Condvar::new(),
            hook: RwLock::new(None),
        })
    }

    /// Number of ranks.
    pub fn nranks(&self) -> usize {
        self.nranks
    }

    /// The backend of rank `rank` (`None` if out of range).
    pub fn rank(self: &Arc<Self>, rank: usize) -> Option<SimBackend> {
        (rank < self.nranks).then(|| SimBackend {
            world: self.clone(),
            rank,
        })
    }

    /// Installs (or removes) the hook that runs inside register and
    /// deregister calls.
    pub fn set_hook(&self, hook: Option<SimHook>) {
        *write(&self.hook) = hook;
    }

    fn hook(&self) -> Option<SimHook> {
        read(&self.hook).clone()
    }

    /// Violations recorded so far.
    pub fn violations(&self) -> Vec<Violation> {
        lock(&self.state).violations.clone()
    }

    /// Every call so far, in the order they completed.
    pub fn trace(&self) -> Vec<TraceEvent> {
        lock(&self.state).trace.clone()
    }

    /// Current figures.
    pub fn stats(&self) -> SimStats {
        lock(&self.state).stats()
    }
}
