//! The allocator: `ncclMemAlloc` + track, untrack + deregister +
//! `ncclMemFree`, and per-comm registration passes over the registry.
//!
//! # Who frees the memory
//!
//! A freed segment's memory goes back to NCCL only after (a) every window
//! that covers it was deregistered and (b) the registry's last hold on it
//! was released. [`Allocator::free`] gives each freed segment a countdown of
//! `windows + 1`: one per window that `untrack` handed back, and one for the
//! registry. Each deregistration counts down, on whichever thread performs
//! it; the registry's count goes down when the last hold is released (by
//! the free itself when no pass holds the segment, else by the free or by
//! the pass, whichever lets go last). A window that a pass registers for a
//! segment already freed (a hand-back) adds one to the countdown before the
//! pass releases its hold. Whoever brings the countdown to zero calls
//! `ncclMemFree`.
//!
//! # One call per comm, frees never wait
//!
//! Every NCCL call on a comm goes through that comm's gate (see
//! `gate.rs`): a deregistration that finds the comm busy (its pass blocked
//! in a register) is queued, and the pass performs it right after its
//! current call. A free therefore never waits for a pass.
//!
//! # Detach
//!
//! [`Allocator::detach`] waits for a running pass on the comm, forgets the
//! comm in the registry (claiming its windows), deregisters them, and then
//! takes the comm table's write lock once: a free holds the read lock from
//! its untrack until its deregistrations are performed or queued, so after
//! that barrier no free still carries a window of the comm, and the gate is
//! drained once more. After a successful detach no call is ever made on the
//! comm again.
//!
//! # Deadlines and aborted comms
//!
//! Every collective call ends by its comm's deadline (`deadline.rs`): on a
//! comm the glue may abort (owned, or borrowed non-blocking with the
//! owner's hook) the calling thread polls and aborts at the deadline, and
//! the comm becomes [`CommState::Aborted`]: NCCL freed its windows inside
//! the abort, so each of them leaves the accounting without an NCCL call
//! (wherever it was: registered, queued, stuck, handed back, held by
//! detach), and every segment's `ncclMemFree` still happens once. On a
//! borrowed blocking comm the watchdog (`watchdog.rs`) reports the stall.
//! `NEVER_HANG.md` has the protocol.
//!
//! # Window lookup
//!
//! [`Allocator::window_of`] answers "which window of this comm covers this
//! tensor, at which offset" (HCCL's `HcclCommSymWinGet`), from the
//! registry alone: no gate, no lock, no NCCL call on the success path. It
//! is linearizable against frees and detaches: a window is returned only
//! if, at some instant during the call, it was recorded for the comm (never
//! after the free that untracked its segment claimed it, hence never after
//! its deregistration began). [`Allocator::window_of_raw`] does the same
//! for a raw `ncclComm_t`, through a lock-free index of attached handles.

mod checked;
mod comm;
mod deadline;
mod detach;
mod free;
mod lookup;
mod pass;
mod raw_index;
mod snapshot;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use segment_registry::{CommId, Registry, Segment};

pub use crate::stats::AllocatorStats;
pub use checked::{
    deadline_from_env, AbortHook, AttachOptions, CommOwner, TestFaults, DEADLINE_ENV,
    DEFAULT_DEADLINE,
};
pub use comm::CommState;
pub use detach::DetachReport;
pub use free::FreeReport;
pub use lookup::WindowError;
pub use pass::PassSummary;
pub use snapshot::CommInfo;

use crate::backend::{Backend, RawComm, Window};
use crate::error::AllocError;
use crate::stats::{bump, Counters};
use crate::util::lock;
use comm::CommEntry;
use free::PendingFree;
use raw_index::RawIndex;

/// A thread-safe allocator of NCCL symmetric memory over the segment
/// registry. See the module docs for the protocol.
///
/// ```
/// # #[cfg(not(feature = "loom"))] {
/// use segment_registry_nccl::{sim::SimWorld, Allocator};
///
/// let world = SimWorld::new(1);
/// let alloc = Allocator::new(world.rank(0).unwrap());
/// let comm = alloc.attach(world.comm_create(&[0]).unwrap()[0]).unwrap();
/// let p = alloc.alloc(4 << 20, 0).unwrap();
/// assert_eq!(alloc.register(comm).unwrap().windows, 1);
/// alloc.free(p).unwrap(); // deregisters, then frees
/// assert_eq!(world.stats().live_windows, 0);
/// assert!(world.verify().is_empty());
/// # }
/// ```
pub struct Allocator<B: Backend> {
    backend: B,
    registry: Registry<RawComm, Window>,
    /// Attached comms. Also the detach barrier (module docs).
    comms: RwLock<BTreeMap<CommId, Arc<CommEntry>>>,
    /// Raw handle → id of the attached comms, for lock-free lookups.
    raw_index: RawIndex,
    /// Freed segments that a pass held when they were untracked, by
    /// `(addr, seq)`, until the registry's last hold is released.
    held_frees: Mutex<HashMap<(usize, u64), Arc<PendingFree>>>,
    /// Shared with the watchdog, which counts stalls.
    counters: Arc<Counters>,
    /// Shared with the watchdog, which reports stalls here too.
    last_error: Arc<Mutex<Option<String>>>,
    /// The negative controls' switches (tests only; all off otherwise).
    faults: TestFaults,
}

impl<B: Backend> std::fmt::Debug for Allocator<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocator")
            .field("backend", &self.backend.name())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Allocator<B> {
    /// An allocator on `backend`, with no comms and no segments.
    pub fn new(backend: B) -> Self {
        Allocator {
            backend,
            registry: Registry::new(),
            comms: RwLock::new(BTreeMap::new()),
            raw_index: RawIndex::new(),
            held_frees: Mutex::new(HashMap::new()),
            counters: Arc::new(Counters::default()),
            last_error: Arc::new(Mutex::new(None)),
            faults: TestFaults::default(),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The tracked segment containing `addr`.
    pub fn find(&self, addr: usize) -> Option<Segment> {
        self.registry.find(addr)
    }

    /// The last error met on behalf of another caller (a deregistration or
    /// `ncclMemFree` done by a pass or by another free, a comm aborted at a
    /// deadline, a stall the watchdog reported), if any.
    pub fn last_async_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    fn note(&self, msg: String) {
        *lock(&self.last_error) = Some(msg);
    }

    /// `ncclMemAlloc(size)` on `device`, then track the segment. Returns the
    /// device pointer. Registration happens later, in a pass.
    pub fn alloc(&self, size: usize, device: i32) -> Result<usize, AllocError> {
        if size == 0 {
            bump(&self.counters.alloc_failures);
            return Err(AllocError::ZeroSize);
        }
        let ptr = match self.backend.mem_alloc(size, device) {
            Ok(p) => p,
            Err(e) => {
                bump(&self.counters.alloc_failures);
                return Err(AllocError::Backend(e));
            }
        };
        match self.registry.track(ptr, size) {
            Ok(_) => {
                bump(&self.counters.allocs);
                Ok(ptr)
            }
            Err(e) => {
                bump(&self.counters.alloc_failures);
                if let Err(fe) = self.backend.mem_free(ptr) {
                    bump(&self.counters.mem_free_failures);
                    self.note(format!("giving back refused segment {ptr:#x}: {fe}"));
                }
                Err(AllocError::Track(e))
            }
        }
    }
}

// The allocator is shared between threads (the C ABI keeps one in a static).
const _: () = {
    const fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Allocator<crate::sim::SimBackend>>();
    is_send_sync::<Allocator<crate::real::RealBackend>>();
    is_send_sync::<Allocator<Box<dyn Backend>>>();
};
