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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, TryLockError};

use segment_registry::{
    CommError, CommId, Hold, PassError as RegPassError, PassFailure, PassReport, Registry, Segment,
    Untracked, WindowLookupError,
};

use crate::backend::{Backend, RawComm, Window, NCCL_WIN_COLL_SYMMETRIC};
use crate::error::{AllocError, AttachError, DetachError, FreeError, RegisterError};
use crate::gate::Gate;
use crate::util::{lock, read, write};

const ACTIVE: u8 = 0;
const FAILED: u8 = 1;
const DETACHING: u8 = 2;
const DETACHED: u8 = 3;

/// The state of an attached comm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommState {
    /// Passes allowed.
    Active,
    /// A registration failed: passes return [`RegisterError::Failed`];
    /// detach it.
    Failed,
    /// A detach began and could not deregister every window yet; call
    /// detach again.
    Detaching,
}

/// A freed segment waiting for its deregistrations and the registry's
/// last hold (see the module docs).
struct PendingFree {
    addr: usize,
    remaining: AtomicUsize,
}

/// A deregistration to perform on a comm.
struct Deferred {
    segment: Segment,
    window: Window,
    /// The freed segment it counts down, if any (detach deregisters windows
    /// of live segments: no countdown).
    free: Option<Arc<PendingFree>>,
}

struct CommEntry {
    id: CommId,
    raw: RawComm,
    gate: Gate<Deferred>,
    /// Held by a pass for its whole run, and by detach.
    pass_lock: Mutex<()>,
    state: AtomicU8,
    failure: Mutex<Option<String>>,
    /// Deregistrations that failed; retried by the next pass and by detach.
    stuck: Mutex<Vec<Deferred>>,
    saw_window: AtomicBool,
    saw_null_window: AtomicBool,
}

impl CommEntry {
    fn state(&self) -> u8 {
        // SeqCst: rare transitions; no reason to be clever.
        self.state.load(Ordering::SeqCst)
    }

    fn fail(&self, reason: String) {
        let mut f = lock(&self.failure);
        if self
            .state
            .compare_exchange(ACTIVE, FAILED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            *f = Some(reason);
        }
    }
}

/// Statistics counters. Relaxed everywhere: they are figures for reports,
/// never used to decide anything.
#[derive(Default)]
struct Counters {
    allocs: AtomicU64,
    alloc_failures: AtomicU64,
    frees: AtomicU64,
    bad_frees: AtomicU64,
    passes: AtomicU64,
    windows_registered: AtomicU64,
    null_windows: AtomicU64,
    register_failures: AtomicU64,
    windows_deregistered: AtomicU64,
    deregisters_deferred: AtomicU64,
    handed_back: AtomicU64,
    deregister_failures: AtomicU64,
    pending_frees: AtomicU64,
    mem_frees: AtomicU64,
    mem_free_failures: AtomicU64,
    orphans: AtomicU64,
}

fn bump(c: &AtomicU64) {
    // Relaxed: statistics only.
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    // Relaxed: statistics only.
    c.load(Ordering::Relaxed)
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

/// What a successful detach did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetachReport {
    /// The comm.
    pub comm: CommId,
    /// Windows the comm still held that this call deregistered (retries
    /// of deregistrations that failed before are not counted).
    pub deregistered: usize,
}

/// A window found by [`Allocator::window_of`]: what NCCL's device API
/// needs to address the tensor, `ncclGetLocalPointer(window, offset)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowHit {
    /// The window registered with the comm for the segment (its `raw` is
    /// the `ncclWindow_t`).
    pub window: Window,
    /// Offset of the queried pointer from the start of the window (the
    /// segment's start: windows cover whole segments).
    pub offset: usize,
    /// The segment that contains the queried range.
    pub segment: Segment,
}

/// Why [`Allocator::window_of`] (or [`Allocator::window_of_raw`]) returned
/// no window. Every answer of the registry has its own variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// The comm is not attached (never attached, detached, or being
    /// detached).
    #[error("{0} is not attached")]
    NotAttached(CommId),
    /// No attached comm has this raw handle ([`Allocator::window_of_raw`]).
    #[error("{0:?} is not attached")]
    UnknownComm(RawComm),
    /// No live allocation of this allocator contains the pointer (an
    /// unknown pointer, or one whose allocation was freed).
    #[error("no live allocation contains {ptr:#x} (unknown pointer, or freed)")]
    NotTracked {
        /// The pointer given.
        ptr: usize,
    },
    /// The range starts inside an allocation but runs past its end.
    #[error(
        "[{ptr:#x}, +{size}) runs past the end of the allocation at {:#x} ({} bytes)",
        segment.addr,
        segment.len
    )]
    CrossesEnd {
        /// The pointer given.
        ptr: usize,
        /// The size given.
        size: usize,
        /// The allocation that contains `ptr`.
        segment: Segment,
    },
    /// The allocation is not registered with this comm yet: no pass has run
    /// on the comm since it was allocated (or one is registering it now).
    #[error(
        "the allocation at {:#x} is not registered with {comm} yet (run a registration pass)",
        segment.addr
    )]
    NotRegistered {
        /// The comm.
        comm: CommId,
        /// The allocation.
        segment: Segment,
    },
    /// Registered, but NCCL returned a null window: the comm has no
    /// symmetric-memory support.
    #[error(
        "the allocation at {:#x} is registered with {comm} without a window \
         (no symmetric support)",
        segment.addr
    )]
    NoWindow {
        /// The comm.
        comm: CommId,
        /// The allocation.
        segment: Segment,
    },
}

impl From<WindowLookupError> for WindowError {
    fn from(e: WindowLookupError) -> Self {
        match e {
            WindowLookupError::NotAttached(c) => WindowError::NotAttached(c),
            WindowLookupError::NotTracked { ptr } => WindowError::NotTracked { ptr },
            WindowLookupError::CrossesEnd { ptr, size, segment } => {
                WindowError::CrossesEnd { ptr, size, segment }
            }
            WindowLookupError::NotRegistered { comm, segment } => {
                WindowError::NotRegistered { comm, segment }
            }
            WindowLookupError::NoWindow { comm, segment } => {
                WindowError::NoWindow { comm, segment }
            }
        }
    }
}

/// Slots of the lock-free raw handle → comm id index. Comms attached beyond
/// this many are found through the comm table (under its read lock).
const RAW_SLOTS: usize = 64;

/// One attached comm of the index: a seqlock over `(raw, id)`. `seq` is odd
/// while a writer changes the pair; `raw == 0` marks a free slot.
struct RawSlot {
    seq: AtomicU64,
    raw: AtomicUsize,
    id: AtomicU64,
}

/// What [`RawIndex::find`] knows about a raw handle.
enum RawLookup {
    /// Attached with this id (at some instant during the call).
    Found(CommId),
    /// Not attached (at some instant during the call).
    Absent,
    /// Not in the slots, but some attached comm has no slot: ask the table.
    Spilled,
}

/// Raw handle → comm id, readable without a lock (for
/// [`Allocator::window_of_raw`]). Written only under the comm table's write
/// lock (attach, the end of detach), so writers never race each other.
///
/// Readers never wait: a slot that is being written, or that changes while
/// it is read, is skipped. That is linearizable because a slot changes only
/// when its comm is attached or detached: a reader that overlaps the change
/// may answer as if it came before the attach or after the detach. Ids are
/// never reused, so an id found for a handle whose comm was detached
/// meanwhile makes the registry answer "not attached", never another comm's
/// window.
struct RawIndex {
    slots: Box<[RawSlot]>,
    /// Slots ever used: readers scan `[0, used)`.
    used: AtomicUsize,
    /// Attached comms that found no free slot.
    spilled: AtomicUsize,
}

impl RawIndex {
    fn new() -> Self {
        RawIndex {
            slots: (0..RAW_SLOTS)
                .map(|_| RawSlot {
                    seq: AtomicU64::new(0),
                    raw: AtomicUsize::new(0),
                    id: AtomicU64::new(0),
                })
                .collect(),
            used: AtomicUsize::new(0),
            spilled: AtomicUsize::new(0),
        }
    }

    /// Seqlock write of one slot. The caller holds the comm table's write
    /// lock (the only writer).
    fn write(slot: &RawSlot, raw: usize, id: u64) {
        // Relaxed: writers are serialized by the table lock.
        let s = slot.seq.load(Ordering::Relaxed);
        slot.seq.store(s + 1, Ordering::Relaxed);
        // Release fence: a reader that sees a new `raw`/`id` below also sees
        // the odd `seq` (it re-reads `seq` after an acquire fence).
        fence(Ordering::Release);
        // Relaxed: published by the release store of `seq` below.
        slot.raw.store(raw, Ordering::Relaxed);
        slot.id.store(id, Ordering::Relaxed);
        // Release: a reader that sees `s + 2` sees the pair written above.
        slot.seq.store(s + 2, Ordering::Release);
    }

    /// Records an attached comm. Caller holds the table's write lock.
    fn insert(&self, raw: RawComm, id: CommId) {
        // Relaxed: only writers (serialized by the lock) change `raw`.
        let free = self
            .slots
            .iter()
            .position(|s| s.raw.load(Ordering::Relaxed) == 0);
        match free {
            Some(i) => {
                Self::write(&self.slots[i], raw.0, id.0);
                // Release: a reader that scans up to `i` sees the slot's
                // writes (made before).
                self.used.fetch_max(i + 1, Ordering::Release);
            }
            None => {
                // SeqCst: rare; ordered with the readers' miss check.
                self.spilled.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Forgets a detached comm. Caller holds the table's write lock.
    fn remove(&self, raw: RawComm) {
        // Relaxed: as in `insert`. Attach refuses a handle already
        // attached, so at most one slot holds `raw`.
        let slot = self
            .slots
            .iter()
            .find(|s| s.raw.load(Ordering::Relaxed) == raw.0);
        match slot {
            Some(s) => Self::write(s, 0, 0),
            None => {
                // SeqCst: as in `insert`.
                self.spilled.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// The id of an attached raw handle. Wait-free; no lock.
    fn find(&self, raw: RawComm) -> RawLookup {
        // Acquire: pairs with `insert`'s release.
        let used = self.used.load(Ordering::Acquire);
        for slot in &self.slots[..used] {
            // Acquire: pairs with the writer's final release store.
            let s1 = slot.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                continue; // being attached or detached: see the type docs
            }
            // Relaxed: validated by the `seq` re-read below.
            if slot.raw.load(Ordering::Relaxed) != raw.0 {
                continue;
            }
            // Relaxed: as above.
            let id = slot.id.load(Ordering::Relaxed);
            // Acquire fence: orders the loads above before the re-read.
            fence(Ordering::Acquire);
            // Relaxed: ordered by the fence.
            if slot.seq.load(Ordering::Relaxed) == s1 {
                return RawLookup::Found(CommId(id));
            }
        }
        // SeqCst: rare path; a spill made before our call is seen.
        if self.spilled.load(Ordering::SeqCst) > 0 {
            RawLookup::Spilled
        } else {
            RawLookup::Absent
        }
    }
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
    counters: Counters,
    last_error: Mutex<Option<String>>,
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
            counters: Counters::default(),
            last_error: Mutex::new(None),
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
    /// `ncclMemFree` done by a pass or by another free), if any.
    pub fn last_async_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    fn note(&self, msg: String) {
        *lock(&self.last_error) = Some(msg);
    }

    // ------------------------------------------------------------------
    // memory
    // ------------------------------------------------------------------

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
        let key = (segment.addr, segment.seq);
        // Link the countdown: a record may exist already, made for a
        // hand-back whose deregistration failed (it carries the registry's
        // share); else make one, and publish it if a hold may outlive ours.
        let (pending, linked) = {
            let mut map = lock(&self.held_frees);
            match map.get(&key) {
                Some(p) => {
                    // AcqRel: as in `count_down`; the registry's share is
                    // still counted, so this never revives a zero count.
                    p.remaining.fetch_add(windows.len(), Ordering::AcqRel);
                    (p.clone(), true)
                }
                None => {
                    let p = Arc::new(PendingFree {
                        addr: segment.addr,
                        remaining: AtomicUsize::new(windows.len() + 1),
                    });
                    // Relaxed: statistics.
                    self.counters.pending_frees.fetch_add(1, Ordering::Relaxed);
                    if pass_hold.is_some() {
                        // Before our hold is released, so that whoever
                        // releases the last hold finds it.
                        map.insert(key, p.clone());
                    }
                    (p, pass_hold.is_some())
                }
            }
        };
        let mut report = FreeReport {
            segment,
            windows: windows.len(),
            deferred: 0,
            held_by_pass: pass_hold.is_some(),
        };
        for (comm, window) in windows {
            let job = Deferred {
                segment,
                window,
                free: Some(pending.clone()),
            };
            match table.get(&comm) {
                Some(entry) => {
                    if entry.gate.submit(job, |j| self.run_deferred(entry, j)) {
                        report.deferred += 1;
                        bump(&self.counters.deregisters_deferred);
                    }
                }
                None => {
                    // Unreachable while every untrack goes through here (see
                    // the detach barrier); the comm is gone, so is its window.
                    bump(&self.counters.orphans);
                    self.note(format!("{window:?} of vanished {comm} dropped"));
                    self.count_down(&pending);
                }
            }
        }
        drop(table);
        let registry_done = match pass_hold {
            None => true,
            Some(hold) => hold.release(),
        };
        if registry_done {
            if linked {
                lock(&self.held_frees).remove(&key);
            }
            self.count_down(&pending);
        }
        Ok(report)
    }

    /// One party of a freed segment is done; the last one frees the memory.
    fn count_down(&self, pending: &PendingFree) {
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
    fn run_deferred(&self, entry: &CommEntry, job: Deferred) {
        match self.backend.comm_window_deregister(entry.raw, job.window) {
            Ok(()) => {
                bump(&self.counters.windows_deregistered);
                if let Some(p) = &job.free {
                    self.count_down(p);
                }
            }
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

    /// Retries the failed deregistrations of a comm.
    fn retry_stuck(&self, entry: &CommEntry) {
        let jobs = std::mem::take(&mut *lock(&entry.stuck));
        for job in jobs {
            entry.gate.submit(job, |j| self.run_deferred(entry, j));
        }
    }

    // ------------------------------------------------------------------
    // comms
    // ------------------------------------------------------------------

    /// Attaches a comm by its raw handle. The id returned is never reused;
    /// the comm's first pass registers every live segment.
    pub fn attach(&self, comm: RawComm) -> Result<CommId, AttachError> {
        if comm.is_null() {
            return Err(AttachError::NullComm);
        }
        let mut table = write(&self.comms);
        if let Some(e) = table.values().find(|e| e.raw == comm) {
            return Err(AttachError::AlreadyAttached {
                raw: comm,
                comm: e.id,
            });
        }
        let id = self.registry.attach(comm);
        table.insert(
            id,
            Arc::new(CommEntry {
                id,
                raw: comm,
                gate: Gate::new(),
                pass_lock: Mutex::new(()),
                state: AtomicU8::new(ACTIVE),
                failure: Mutex::new(None),
                stuck: Mutex::new(Vec::new()),
                saw_window: AtomicBool::new(false),
                saw_null_window: AtomicBool::new(false),
            }),
        );
        self.raw_index.insert(comm, id);
        Ok(id)
    }

    /// The id of an attached raw handle.
    pub fn comm_id(&self, comm: RawComm) -> Option<CommId> {
        read(&self.comms)
            .values()
            .find(|e| e.raw == comm)
            .map(|e| e.id)
    }

    /// The window registered with `comm` for the allocation that contains
    /// the whole byte range `[ptr, ptr + size)`, and the offset of `ptr` in
    /// it: the arguments of NCCL's device-side
    /// `ncclGetLocalPointer(window, offset)` (HCCL: `HcclCommSymWinGet`).
    ///
    /// Lock-free on success: it reads the registry only (no gate, no lock,
    /// no NCCL call), so it never waits for a pass, a free or a detach.
    /// Error answers may read the registry's comm table under its read lock
    /// to tell "not attached" apart.
    ///
    /// Linearizable against [`free`](Self::free) and
    /// [`detach`](Self::detach): the window returned was recorded for the
    /// comm at some instant during the call, so a lookup that starts after
    /// a free began deregistering the window never returns it. A free that
    /// overlaps the call can still deregister the window before the caller
    /// uses it: freeing a tensor's memory while it is in use is the
    /// caller's race, as with any allocator.
    ///
    /// A comm marked failed keeps the windows it registered before the
    /// failure, and they are returned until it is detached.
    ///
    /// ```
    /// # #[cfg(not(feature = "loom"))] {
    /// use segment_registry_nccl::{allocator::WindowError, sim::SimWorld, Allocator};
    ///
    /// let world = SimWorld::new(1);
    /// let alloc = Allocator::new(world.rank(0).unwrap());
    /// let comm = alloc.attach(world.comm_create(&[0]).unwrap()[0]).unwrap();
    /// let p = alloc.alloc(4 << 20, 0).unwrap();
    /// let t = p + 8192; // a tensor carved out of the allocation
    /// assert!(matches!(alloc.window_of(comm, t, 1024), Err(WindowError::NotRegistered { .. })));
    /// alloc.register(comm).unwrap();
    /// let hit = alloc.window_of(comm, t, 1024).unwrap();
    /// assert_eq!((hit.offset, hit.segment.addr), (8192, p));
    /// alloc.free(p).unwrap();
    /// assert!(matches!(alloc.window_of(comm, t, 1024), Err(WindowError::NotTracked { .. })));
    /// # }
    /// ```
    pub fn window_of(
        &self,
        comm: CommId,
        ptr: usize,
        size: usize,
    ) -> Result<WindowHit, WindowError> {
        let found = self.registry.window_of(comm, ptr, size)?;
        Ok(WindowHit {
            window: found.window,
            offset: found.offset,
            segment: found.segment,
        })
    }

    /// [`window_of`](Self::window_of) for a raw `ncclComm_t`: finds the
    /// comm's id in a lock-free index of attached handles (wait-free, no
    /// lock), then looks the window up. Also lock-free on success, unless
    /// more than 64 comms are attached at once: a comm that found no slot
    /// in the index is looked up in the comm table under its read lock.
    ///
    /// A handle whose comm was detached answers
    /// [`WindowError::UnknownComm`] (or [`WindowError::NotAttached`] when
    /// the detach overlaps the call), never a window of a comm attached
    /// later at the same address.
    pub fn window_of_raw(
        &self,
        comm: RawComm,
        ptr: usize,
        size: usize,
    ) -> Result<WindowHit, WindowError> {
        let id = match self.raw_index.find(comm) {
            RawLookup::Found(id) => id,
            RawLookup::Absent => return Err(WindowError::UnknownComm(comm)),
            RawLookup::Spilled => self.comm_id(comm).ok_or(WindowError::UnknownComm(comm))?,
        };
        self.window_of(id, ptr, size)
    }

    /// Attached comms, in attach order.
    pub fn comms(&self) -> Vec<CommId> {
        read(&self.comms).keys().copied().collect()
    }

    fn entry(&self, comm: CommId) -> Option<Arc<CommEntry>> {
        read(&self.comms).get(&comm).cloned()
    }

    /// Runs a registration pass for `comm`: registers (collectively, flag
    /// `NCCL_WIN_COLL_SYMMETRIC`) every live segment it has not seen, in
    /// track order. Segments freed while the pass holds them are still
    /// registered, then deregistered and freed by the pass.
    ///
    /// A failed registration marks the comm failed: this pass and every
    /// later one return an error, and only [`detach`](Self::detach) is
    /// allowed. A second pass on the same comm meanwhile gets
    /// [`RegisterError::Busy`].
    pub fn register(&self, comm: CommId) -> Result<PassSummary, RegisterError> {
        let entry = self.entry(comm).ok_or(RegisterError::NotAttached(comm))?;
        let _pass = match entry.pass_lock.try_lock() {
            Ok(g) => g,
            Err(TryLockError::WouldBlock) => return Err(RegisterError::Busy(comm)),
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        };
        match entry.state() {
            ACTIVE => {}
            FAILED => {
                return Err(RegisterError::Failed {
                    comm,
                    reason: lock(&entry.failure).clone().unwrap_or_default(),
                })
            }
            _ => return Err(RegisterError::NotAttached(comm)),
        }
        bump(&self.counters.passes);
        self.retry_stuck(&entry);
        let (mut windows, mut nulls) = (0, 0);
        let result = self.registry.register_pending(comm, |raw, seg| {
            let r = entry.gate.call(
                || {
                    self.backend.comm_window_register(
                        *raw,
                        seg.addr,
                        seg.len,
                        NCCL_WIN_COLL_SYMMETRIC,
                    )
                },
                |j| self.run_deferred(&entry, j),
            );
            match &r {
                Ok(Some(_)) => windows += 1,
                Ok(None) => nulls += 1,
                Err(_) => {}
            }
            r
        });
        let (report, error) = match result {
            Ok(report) => (report, None),
            Err(PassFailure { error, report }) => (report, Some(error)),
        };
        self.counters
            .windows_registered
            .fetch_add(windows as u64, Ordering::Relaxed); // Relaxed: statistics.
        self.counters
            .null_windows
            .fetch_add(nulls as u64, Ordering::Relaxed); // Relaxed: statistics.
        if windows > 0 {
            // Relaxed: a diagnostic flag.
            entry.saw_window.store(true, Ordering::Relaxed);
        }
        if nulls > 0 {
            // Relaxed: a diagnostic flag.
            entry.saw_null_window.store(true, Ordering::Relaxed);
        }
        let summary = PassSummary {
            comm,
            registered: report.registered.clone(),
            windows,
            null_windows: nulls,
            handed_back: report.handed_back.len(),
        };
        self.settle(&entry, report);
        match error {
            None => Ok(summary),
            Some(RegPassError::Callback { segment, error }) => {
                bump(&self.counters.register_failures);
                entry.fail(format!("registering segment {:#x}: {error}", segment.addr));
                Err(RegisterError::Register {
                    comm,
                    segment,
                    source: error,
                })
            }
            Some(RegPassError::Comm(CommError::Busy(c))) => Err(RegisterError::Busy(c)),
            Some(RegPassError::Comm(CommError::NotAttached(c)) | RegPassError::Forgotten(c)) => {
                Err(RegisterError::NotAttached(c))
            }
        }
    }

    /// Acts on a pass's report: deregisters hand-backs (then releases
    /// their holds) and counts down segments whose last hold the pass
    /// released.
    fn settle(&self, entry: &CommEntry, report: PassReport<'_, Window>) {
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
    fn hand_back(
        &self,
        entry: &CommEntry,
        segment: Segment,
        window: Window,
        hold: Hold<'_, Window>,
    ) -> bool {
        let r = entry.gate.call(
            || self.backend.comm_window_deregister(entry.raw, window),
            |j| self.run_deferred(entry, j),
        );
        match r {
            Ok(()) => {
                bump(&self.counters.windows_deregistered);
                if hold.release() {
                    self.registry_released(segment);
                }
                true
            }
            Err(e) => {
                bump(&self.counters.deregister_failures);
                self.note(format!(
                    "deregistering {window:?} of segment {:#x} on {}: {e}",
                    segment.addr, entry.id
                ));
                let pending = {
                    let mut map = lock(&self.held_frees);
                    let p = map.entry((segment.addr, segment.seq)).or_insert_with(|| {
                        // Relaxed: statistics.
                        self.counters.pending_frees.fetch_add(1, Ordering::Relaxed);
                        // The registry's share, counted down by whoever
                        // releases the last hold (or by the segment's free).
                        Arc::new(PendingFree {
                            addr: segment.addr,
                            remaining: AtomicUsize::new(1),
                        })
                    });
                    // AcqRel: as in `count_down`; our hold keeps the
                    // registry's share counted, so the count is not zero.
                    p.remaining.fetch_add(1, Ordering::AcqRel);
                    p.clone()
                };
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
        }
    }

    /// The registry's last hold on a freed segment is gone.
    fn registry_released(&self, seg: Segment) {
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

    /// Detaches a comm: waits for a pass running on it, deregisters every
    /// window it holds, and makes sure no free still has one queued or in
    /// hand. Required before the comm is destroyed. On
    /// [`DetachError::Incomplete`] the comm stays attached (no passes) and
    /// detach can be called again.
    pub fn detach(&self, comm: CommId) -> Result<DetachReport, DetachError> {
        let entry = self.entry(comm).ok_or(DetachError::NotAttached(comm))?;
        let _pass = lock(&entry.pass_lock);
        if entry.state() == DETACHED {
            return Err(DetachError::NotAttached(comm));
        }
        // SeqCst: rare transition.
        entry.state.store(DETACHING, Ordering::SeqCst);
        // A retried detach finds the comm forgotten already: nothing new.
        let mut deregistered = 0;
        if let Ok(forgotten) = self.registry.forget(comm) {
            for hb in forgotten.windows {
                if self.hand_back(&entry, hb.segment, hb.window, hb.hold) {
                    deregistered += 1;
                }
            }
            for seg in forgotten.free_now {
                self.registry_released(seg);
            }
        }
        // Barrier: frees that claimed a window of this comm before `forget`
        // hold the read lock until they have performed or queued it.
        drop(write(&self.comms));
        // Run what they queued (waits for a free that is running some).
        entry.gate.call(|| (), |j| self.run_deferred(&entry, j));
        // Retry failed deregistrations here and now (not queued to some
        // other thread: after detach returns, no call may touch the comm).
        let jobs = std::mem::take(&mut *lock(&entry.stuck));
        for job in jobs {
            entry.gate.call(
                || self.run_deferred(&entry, job),
                |j| self.run_deferred(&entry, j),
            );
        }
        let stuck = lock(&entry.stuck).len();
        if stuck > 0 {
            return Err(DetachError::Incomplete {
                comm,
                remaining: stuck,
                last: self.last_async_error().unwrap_or_default(),
            });
        }
        entry.state.store(DETACHED, Ordering::SeqCst); // SeqCst: rare transition.
        let mut table = write(&self.comms);
        table.remove(&comm);
        self.raw_index.remove(entry.raw);
        drop(table);
        Ok(DetachReport { comm, deregistered })
    }

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
                    state: match e.state() {
                        ACTIVE => CommState::Active,
                        FAILED => CommState::Failed,
                        _ => CommState::Detaching,
                    },
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

    /// Frees every live allocation, in track order (for shutdown). Returns
    /// how many were freed.
    pub fn free_all(&self) -> usize {
        self.registry
            .segments_by_seq()
            .into_iter()
            .filter(|s| self.free(s.addr).is_ok())
            .count()
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

// The allocator is shared between threads (the C ABI keeps one in a static).
const _: () = {
    const fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Allocator<crate::sim::SimBackend>>();
    is_send_sync::<Allocator<crate::real::RealBackend>>();
    is_send_sync::<Allocator<Box<dyn Backend>>>();
};
