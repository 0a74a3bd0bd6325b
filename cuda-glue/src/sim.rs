//! A simulated NCCL for CPU machines and CI: several ranks of several comms
//! in one process, with NCCL's rules checked and every breach recorded as a
//! [`Violation`] (collected, queryable), plus fault injection.
//!
//! A [`SimWorld`] holds `n` simulated ranks (processes). Each rank has its
//! own fake device address space (addresses differ between ranks, as in a
//! real job; the memory is never dereferenceable); [`SimWorld::rank`] gives
//! the [`Backend`] of one rank, to build that rank's allocator on.
//! [`SimWorld::comm_create`] makes a comm over some ranks and returns one raw
//! handle per member; raw handle values, like `ncclComm_t` addresses and
//! window handles, are reused after destroy/deregister.
//!
//! Rules checked (see [`Violation`]): collective registration must match in
//! order (which buffer), size and count across the members of a comm; one
//! call at a time per comm and rank; no memory freed while a window or an
//! in-flight registration covers it; no duplicate registration; deregister
//! once, on the right comm; 4096-byte alignment; no null comm.
//!
//! Registration is not a blocking rendezvous here: each rank's call returns
//! at once and the collective check compares the ranks' logs position by
//! position. A test can park a call with [`SimWorld::set_hook`], which runs
//! while the call is in flight (after its checks, before its outcome).
//!
//! Which buffer a registration names is compared across ranks by a
//! [`BufferId`]: the allocation site label the allocating thread set with
//! [`set_alloc_site`] and the allocation's number among that site's on its
//! rank.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use crate::backend::{Backend, BackendError, RawComm, Window, MEM_GRANULARITY, WINDOW_ALIGN};
use crate::util::{lock, read, write};

/// Base of rank 0's fake device address space.
const VA_BASE: usize = 0x7f00_0000_0000;
/// Distance between two ranks' address spaces.
const VA_STRIDE: usize = 0x20_0000_0000;
/// Capacity of one rank's fake device memory.
const VA_CAPACITY: usize = 0x10_0000_0000;
/// First raw comm handle value, and the distance between two.
const COMM_HANDLE_BASE: usize = 0x5500_0000;
/// First raw window handle value, and the distance between two.
const WINDOW_HANDLE_BASE: usize = 0x6600_0000;
const HANDLE_STRIDE: usize = 0x40;

thread_local! {
    static SITE: RefCell<Option<Arc<str>>> = const { RefCell::new(None) };
}

/// Labels the allocations the calling thread makes from now on (`None`
/// clears it). Ranks that run the same program label the same sites the
/// same way; the simulator then names each buffer by (site, number) and
/// reports ranks that register different buffers at the same position.
///
/// Once the thread's thread-locals are destroyed (at thread exit) it does
/// nothing, and the thread's allocations are unlabelled.
pub fn set_alloc_site(label: Option<&str>) {
    let label = label.map(Arc::from);
    let _ = SITE.try_with(|s| {
        if let Ok(mut site) = s.try_borrow_mut() {
            *site = label;
        }
    });
}

/// The calling thread's label; `None` also once its thread-locals are
/// destroyed (an allocation from a thread-exit handler is unlabelled
/// instead of a panic).
fn current_site() -> Option<Arc<str>> {
    SITE.try_with(|s| s.try_borrow().ok().and_then(|site| site.clone()))
        .ok()
        .flatten()
}

/// The name of a simulated allocation that is the same on every rank that
/// runs the same program: its site label and its number among that site's
/// allocations on its rank (1, 2, …).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BufferId {
    /// The label set with [`set_alloc_site`] (`None`: unlabelled).
    pub site: Option<Arc<str>>,
    /// The allocation's number among the site's on its rank.
    pub index: u64,
}

impl fmt::Display for BufferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.site {
            Some(s) => write!(f, "{s}#{}", self.index),
            None => write!(f, "#{}", self.index),
        }
    }
}

/// A simulated NCCL call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SimOp {
    /// `ncclMemAlloc`.
    MemAlloc,
    /// `ncclMemFree`.
    MemFree,
    /// `ncclCommWindowRegister`.
    Register,
    /// `ncclCommWindowDeregister`.
    Deregister,
}

impl SimOp {
    fn call(self) -> &'static str {
        match self {
            SimOp::MemAlloc => "ncclMemAlloc",
            SimOp::MemFree => "ncclMemFree",
            SimOp::Register => "ncclCommWindowRegister",
            SimOp::Deregister => "ncclCommWindowDeregister",
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

/// A call in flight, as the hook sees it.
#[derive(Clone, Debug)]
pub struct SimCall {
    /// The simulated rank making it.
    pub rank: usize,
    /// Which call (only [`SimOp::Register`] and [`SimOp::Deregister`] reach
    /// the hook).
    pub op: SimOp,
    /// The raw comm handle.
    pub comm: RawComm,
    /// The simulator's id of that comm.
    pub comm_id: u64,
    /// The buffer (register) or zero.
    pub ptr: usize,
    /// The buffer's size (register) or zero.
    pub size: usize,
    /// The window (deregister) or `None`.
    pub window: Option<Window>,
}

/// A hook that runs inside every register and deregister call while it is
/// in flight (no simulator lock held). Tests park calls on barriers here.
pub type SimHook = Arc<dyn Fn(&SimCall) + Send + Sync>;

/// How two ranks' registrations at the same position differ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// Different sizes.
    Size {
        /// The first rank's size.
        first: usize,
        /// The other rank's size.
        other: usize,
    },
    /// Same size, different buffers: the ranks' registration order differs.
    Order {
        /// The first rank's buffer.
        first: Option<BufferId>,
        /// The other rank's buffer.
        other: Option<BufferId>,
    },
}

/// A breach of NCCL's rules that the simulator saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Two members of a comm made different registrations at the same
    /// position of their collective sequence.
    CollectiveMismatch {
        /// Simulator comm id.
        comm: u64,
        /// Position in the sequence (0-based).
        index: usize,
        /// The rank that made the call first, and the one that differs.
        ranks: (usize, usize),
        /// How they differ.
        what: Mismatch,
    },
    /// Members of a comm made different numbers of registrations (checked by
    /// [`SimWorld::verify`] and when the last member destroys the comm).
    CollectiveCountMismatch {
        /// Simulator comm id.
        comm: u64,
        /// `(rank, registrations)` per member.
        counts: Vec<(usize, usize)>,
    },
    /// Two calls were in flight on one comm and rank at the same time.
    ConcurrentCalls {
        /// Simulator comm id.
        comm: u64,
        /// The rank.
        rank: usize,
        /// The call already in flight.
        first: &'static str,
        /// The call that came in meanwhile.
        second: &'static str,
    },
    /// Memory freed while a window still covered it (NCCL returns success
    /// and silently keeps the window and the mapping).
    FreedWhileRegistered {
        /// The rank.
        rank: usize,
        /// The allocation freed.
        ptr: usize,
        /// A window still covering it.
        window: Window,
    },
    /// Memory freed while a registration of it was in flight.
    FreedDuringRegistration {
        /// The rank.
        rank: usize,
        /// The allocation freed.
        ptr: usize,
    },
    /// A range registered again on a comm that already has a window over it
    /// (NCCL ≥ 2.28.7 returns a second window).
    DuplicateRegistration {
        /// Simulator comm id.
        comm: u64,
        /// The rank.
        rank: usize,
        /// The buffer.
        ptr: usize,
        /// The window already there.
        existing: Window,
    },
    /// A window deregistered that is not registered (twice, or a stale
    /// handle whose value was reissued).
    DoubleDeregister {
        /// Simulator comm id.
        comm: u64,
        /// The rank.
        rank: usize,
        /// The window given.
        window: Window,
    },
    /// A window deregistered on a comm other than its own.
    WrongComm {
        /// The rank.
        rank: usize,
        /// The window.
        window: Window,
        /// Comm it belongs to.
        registered_on: u64,
        /// Comm it was deregistered on.
        called_on: u64,
    },
    /// A buffer not aligned to 4096 bytes.
    Misaligned {
        /// Simulator comm id.
        comm: u64,
        /// The rank.
        rank: usize,
        /// The buffer.
        ptr: usize,
    },
    /// A call with a null comm (NCCL 2.28 segfaults).
    NullComm {
        /// The rank.
        rank: usize,
        /// The call.
        call: &'static str,
    },
    /// A call on a comm handle that is not live (never made, or destroyed).
    UnknownComm {
        /// The rank.
        rank: usize,
        /// The call.
        call: &'static str,
        /// The handle.
        raw: usize,
    },
    /// A comm handle of another rank used on this one.
    ForeignComm {
        /// The rank that made the call.
        rank: usize,
        /// The handle.
        raw: usize,
        /// The rank it belongs to.
        owner: usize,
    },
    /// A registration of memory that this rank did not allocate (NCCL:
    /// `ncclUnhandledCudaError`).
    UnknownBuffer {
        /// Simulator comm id.
        comm: u64,
        /// The rank.
        rank: usize,
        /// The buffer.
        ptr: usize,
        /// Its size.
        size: usize,
    },
    /// `ncclMemFree` of memory that is not allocated (double free or stray
    /// pointer).
    BadFree {
        /// The rank.
        rank: usize,
        /// The pointer.
        ptr: usize,
    },
    /// A comm destroyed while windows were still registered on it.
    DestroyWithWindows {
        /// Simulator comm id.
        comm: u64,
        /// The rank.
        rank: usize,
        /// How many.
        windows: usize,
    },
}

impl Violation {
    /// A short name of the rule broken, for grouping and summaries.
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::CollectiveMismatch {
                what: Mismatch::Size { .. },
                ..
            } => "collective-size",
            Violation::CollectiveMismatch {
                what: Mismatch::Order { .. },
                ..
            } => "collective-order",
            Violation::CollectiveCountMismatch { .. } => "collective-count",
            Violation::ConcurrentCalls { .. } => "concurrent-calls",
            Violation::FreedWhileRegistered { .. } => "freed-while-registered",
            Violation::FreedDuringRegistration { .. } => "freed-during-registration",
            Violation::DuplicateRegistration { .. } => "duplicate-registration",
            Violation::DoubleDeregister { .. } => "double-deregister",
            Violation::WrongComm { .. } => "wrong-comm",
            Violation::Misaligned { .. } => "misaligned",
            Violation::NullComm { .. } => "null-comm",
            Violation::UnknownComm { .. } => "unknown-comm",
            Violation::ForeignComm { .. } => "foreign-comm",
            Violation::UnknownBuffer { .. } => "unknown-buffer",
            Violation::BadFree { .. } => "bad-free",
            Violation::DestroyWithWindows { .. } => "destroy-with-windows",
        }
    }
}

/// One simulated call, as the trace records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    /// The rank.
    pub rank: usize,
    /// The call.
    pub op: SimOp,
    /// The comm (null for memory calls).
    pub comm: RawComm,
    /// The pointer (register, alloc, free) or zero.
    pub ptr: usize,
    /// The window issued (register) or given (deregister).
    pub window: Option<Window>,
    /// Whether the call succeeded.
    pub ok: bool,
}

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
}

struct Alloc {
    len: usize,
    buffer: BufferId,
}

struct RankState {
    base: usize,
    allocs: BTreeMap<usize, Alloc>,
    site_counts: HashMap<Option<Arc<str>>, u64>,
    /// Registrations in flight: (comm, ptr, size).
    inflight: Vec<(u64, usize, usize)>,
    calls: [u64; 4],
}

#[derive(Clone)]
struct RegEntry {
    size: usize,
    buffer: Option<BufferId>,
}

struct Member {
    rank: usize,
    alive: bool,
    /// Calls in flight on this comm and rank, by name.
    in_call: Vec<&'static str>,
    regs: Vec<RegEntry>,
}

struct CommState {
    symmetric: bool,
    members: Vec<Member>,
    count_reported: bool,
}

struct WinInfo {
    generation: u64,
    comm: u64,
    rank: usize,
    ptr: usize,
    len: usize,
}

struct Fault {
    rank: usize,
    op: SimOp,
    nth: u64,
    seen: u64,
}

struct WorldState {
    ranks: Vec<RankState>,
    comms: BTreeMap<u64, CommState>,
    /// Live raw comm handle → (comm id, member index).
    handles: HashMap<usize, (u64, usize)>,
    free_comm_handles: Vec<usize>,
    next_comm_handle: usize,
    next_comm_id: u64,
    windows: HashMap<usize, WinInfo>,
    free_window_raws: Vec<usize>,
    next_window_raw: usize,
    next_generation: u64,
    violations: Vec<Violation>,
    trace: Vec<TraceEvent>,
    faults: Vec<Fault>,
    stats: SimStats,
}

/// A simulated job of several ranks. Share it in an [`Arc`].
pub struct SimWorld {
    nranks: usize,
    state: Mutex<WorldState>,
    hook: RwLock<Option<SimHook>>,
}

impl fmt::Debug for SimWorld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimWorld")
            .field("nranks", &self.nranks)
            .finish_non_exhaustive()
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

fn rejected(call: &'static str, reason: impl Into<String>) -> BackendError {
    BackendError::SimRejected {
        call,
        reason: reason.into(),
    }
}

impl SimWorld {
    /// A world of `nranks` simulated ranks (at least one).
    pub fn new(nranks: usize) -> Arc<Self> {
        let nranks = nranks.max(1);
        let ranks = (0..nranks)
            .map(|r| RankState {
                base: VA_BASE + r * VA_STRIDE,
                allocs: BTreeMap::new(),
                site_counts: HashMap::new(),
                inflight: Vec::new(),
                calls: [0; 4],
            })
            .collect();
        Arc::new(SimWorld {
            nranks,
            state: Mutex::new(WorldState {
                ranks,
                comms: BTreeMap::new(),
                handles: HashMap::new(),
                free_comm_handles: Vec::new(),
                next_comm_handle: COMM_HANDLE_BASE,
                next_comm_id: 1,
                windows: HashMap::new(),
                free_window_raws: Vec::new(),
                next_window_raw: WINDOW_HANDLE_BASE,
                next_generation: 1,
                violations: Vec::new(),
                trace: Vec::new(),
                faults: Vec::new(),
                stats: SimStats::default(),
            }),
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

    /// Creates a comm over `ranks` (distinct, in range) with symmetric
    /// support, and returns one raw handle per member, in the order given.
    /// Handle values of destroyed comms are reused.
    pub fn comm_create(&self, ranks: &[usize]) -> Result<Vec<RawComm>, BackendError> {
        self.comm_create_with(ranks, true)
    }

    /// Like [`comm_create`](Self::comm_create), for a comm without symmetric
    /// support: its registrations succeed with a null window (NCCL 2.29+).
    pub fn comm_create_without_symmetric(
        &self,
        ranks: &[usize],
    ) -> Result<Vec<RawComm>, BackendError> {
        self.comm_create_with(ranks, false)
    }

    fn comm_create_with(
        &self,
        ranks: &[usize],
        symmetric: bool,
    ) -> Result<Vec<RawComm>, BackendError> {
        let mut sorted = ranks.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if ranks.is_empty()
            || sorted.len() != ranks.len()
            || sorted.iter().any(|&r| r >= self.nranks)
        {
            return Err(BackendError::InvalidArgument {
                call: "ncclCommInitRank",
                reason: format!("ranks {ranks:?} of a world of {}", self.nranks),
            });
        }
        let mut st = lock(&self.state);
        let id = st.next_comm_id;
        st.next_comm_id += 1;
        let mut members = Vec::with_capacity(ranks.len());
        let mut out = Vec::with_capacity(ranks.len());
        for (i, &rank) in ranks.iter().enumerate() {
            let handle = match st.free_comm_handles.pop() {
                Some(h) => h,
                None => {
                    let h = st.next_comm_handle;
                    st.next_comm_handle += HANDLE_STRIDE;
                    h
                }
            };
            st.handles.insert(handle, (id, i));
            members.push(Member {
                rank,
                alive: true,
                in_call: Vec::new(),
                regs: Vec::new(),
            });
            out.push(RawComm(handle));
        }
        st.comms.insert(
            id,
            CommState {
                symmetric,
                members,
                count_reported: false,
            },
        );
        Ok(out)
    }

    /// The simulator's id of a live comm handle.
    pub fn comm_id(&self, comm: RawComm) -> Option<u64> {
        lock(&self.state).handles.get(&comm.0).map(|&(id, _)| id)
    }

    /// Destroys one member's handle (`ncclCommDestroy`). Windows still
    /// registered on it are dropped and reported as a violation (detach
    /// first). When the last member is gone, the count check runs.
    pub fn comm_destroy(&self, comm: RawComm) -> Result<(), BackendError> {
        let mut st = lock(&self.state);
        let Some((id, idx)) = st.handles.remove(&comm.0) else {
            return Err(rejected(
                "ncclCommDestroy",
                format!("{comm:?} is not a live comm"),
            ));
        };
        st.free_comm_handles.push(comm.0);
        let member = &st.comms[&id].members[idx];
        let rank = member.rank;
        if let Some(&first) = member.in_call.first() {
            // The destroy is a second call on (comm, rank).
            st.violations.push(Violation::ConcurrentCalls {
                comm: id,
                rank,
                first,
                second: "ncclCommDestroy",
            });
        }
        let stale: Vec<usize> = st
            .windows
            .iter()
            .filter(|(_, w)| w.comm == id && w.rank == rank)
            .map(|(&raw, _)| raw)
            .collect();
        if !stale.is_empty() {
            st.violations.push(Violation::DestroyWithWindows {
                comm: id,
                rank,
                windows: stale.len(),
            });
            for raw in stale {
                st.windows.remove(&raw);
                st.free_window_raws.push(raw);
            }
        }
        let all_gone = {
            let c = st.comms.get_mut(&id).map(|c| {
                c.members[idx].alive = false;
                c.members.iter().all(|m| !m.alive)
            });
            c.unwrap_or(false)
        };
        if all_gone {
            check_counts(&mut st, id);
            st.comms.remove(&id);
        }
        Ok(())
    }

    /// Installs (or removes) the hook that runs inside register and
    /// deregister calls.
    pub fn set_hook(&self, hook: Option<SimHook>) {
        *write(&self.hook) = hook;
    }

    /// Arms a fault: the `nth` call (1-based, counted from now) of `op` on
    /// `rank` fails with [`BackendError::Injected`]. A failed register
    /// still counts as a collective call; a failed deregister leaves the
    /// window registered; a failed free leaves the memory allocated.
    pub fn fail_nth(&self, rank: usize, op: SimOp, nth: u64) {
        lock(&self.state).faults.push(Fault {
            rank,
            op,
            nth: nth.max(1),
            seen: 0,
        });
    }

    /// Violations recorded so far.
    pub fn violations(&self) -> Vec<Violation> {
        lock(&self.state).violations.clone()
    }

    /// Runs the end-of-run checks (registration counts of every live comm)
    /// and returns every violation recorded.
    pub fn verify(&self) -> Vec<Violation> {
        let mut st = lock(&self.state);
        let ids: Vec<u64> = st.comms.keys().copied().collect();
        for id in ids {
            check_counts(&mut st, id);
        }
        st.violations.clone()
    }

    /// Every call so far, in the order they completed.
    pub fn trace(&self) -> Vec<TraceEvent> {
        lock(&self.state).trace.clone()
    }

    /// Current figures.
    pub fn stats(&self) -> SimStats {
        let st = lock(&self.state);
        let mut s = st.stats;
        s.live_allocs = st.ranks.iter().map(|r| r.allocs.len()).sum();
        s.live_windows = st.windows.len();
        s.live_comms = st.comms.len();
        s
    }

    /// Whether `ptr` is the start of a live allocation of `rank`.
    pub fn is_allocated(&self, rank: usize, ptr: usize) -> bool {
        lock(&self.state)
            .ranks
            .get(rank)
            .is_some_and(|r| r.allocs.contains_key(&ptr))
    }

    /// Live windows registered through this comm handle.
    pub fn windows_on(&self, comm: RawComm) -> Vec<Window> {
        let st = lock(&self.state);
        let Some(&(id, idx)) = st.handles.get(&comm.0) else {
            return Vec::new();
        };
        let rank = st.comms[&id].members[idx].rank;
        let mut v: Vec<Window> = st
            .windows
            .iter()
            .filter(|(_, w)| w.comm == id && w.rank == rank)
            .map(|(&raw, w)| Window {
                raw,
                generation: w.generation,
            })
            .collect();
        v.sort_by_key(|w| w.generation);
        v
    }

    /// The number of registrations (including failed ones) each member of
    /// the comm made, as `(rank, count)`.
    pub fn registration_counts(&self, comm_id: u64) -> Vec<(usize, usize)> {
        lock(&self.state)
            .comms
            .get(&comm_id)
            .map(|c| c.members.iter().map(|m| (m.rank, m.regs.len())).collect())
            .unwrap_or_default()
    }

    fn hook(&self) -> Option<SimHook> {
        read(&self.hook).clone()
    }

    /// Counts a call of `op` on `rank` and fires an armed fault.
    fn fault(st: &mut WorldState, rank: usize, op: SimOp) -> Option<BackendError> {
        if let Some(r) = st.ranks.get_mut(rank) {
            r.calls[op.slot()] += 1;
        }
        let mut fired = None;
        // Every armed fault counts the call; one that reaches its number is
        // spent (the first such one reports).
        st.faults.retain_mut(|f| {
            if f.rank != rank || f.op != op {
                return true;
            }
            f.seen += 1;
            if f.seen < f.nth {
                return true;
            }
            fired.get_or_insert(BackendError::Injected {
                call: op.call(),
                nth: f.nth,
                rank,
            });
            false
        });
        fired
    }

    /// Resolves a comm handle used by `rank` for `op`, recording violations.
    fn resolve(
        st: &mut WorldState,
        rank: usize,
        comm: RawComm,
        op: SimOp,
    ) -> Result<(u64, usize), BackendError> {
        let call = op.call();
        if comm.is_null() {
            st.violations.push(Violation::NullComm { rank, call });
            return Err(BackendError::NullComm { call });
        }
        let Some(&(id, idx)) = st.handles.get(&comm.0) else {
            st.violations.push(Violation::UnknownComm {
                rank,
                call,
                raw: comm.0,
            });
            return Err(rejected(call, format!("{comm:?} is not a live comm")));
        };
        let owner = st.comms[&id].members[idx].rank;
        if owner != rank {
            st.violations.push(Violation::ForeignComm {
                rank,
                raw: comm.0,
                owner,
            });
            return Err(rejected(call, format!("{comm:?} belongs to rank {owner}")));
        }
        Ok((id, idx))
    }

    /// Whether `comm` still names member `idx` of comm `id`, as it did when
    /// a call checked it before going in flight: a destroy meanwhile (and a
    /// new comm that got the handle value back) must not see the call's
    /// outcome.
    fn still_live(st: &WorldState, comm: RawComm, id: u64, idx: usize) -> bool {
        st.handles.get(&comm.0) == Some(&(id, idx))
    }

    /// Marks a call in flight on (comm, member), reporting a concurrent one.
    fn enter(st: &mut WorldState, id: u64, idx: usize, call: &'static str) {
        let Some(c) = st.comms.get_mut(&id) else {
            return;
        };
        let m = &mut c.members[idx];
        if let Some(&first) = m.in_call.first() {
            let rank = m.rank;
            st.violations.push(Violation::ConcurrentCalls {
                comm: id,
                rank,
                first,
                second: call,
            });
        }
        if let Some(c) = st.comms.get_mut(&id) {
            c.members[idx].in_call.push(call);
        }
    }

    fn leave(st: &mut WorldState, id: u64, idx: usize, call: &'static str) {
        if let Some(c) = st.comms.get_mut(&id) {
            let calls = &mut c.members[idx].in_call;
            if let Some(i) = calls.iter().position(|&c| c == call) {
                calls.remove(i);
            }
        }
    }

    fn mem_alloc(&self, rank: usize, size: usize, device: i32) -> Result<usize, BackendError> {
        let mut st = lock(&self.state);
        let result = Self::mem_alloc_locked(&mut st, rank, size, device);
        st.trace.push(TraceEvent {
            rank,
            op: SimOp::MemAlloc,
            comm: RawComm(0),
            ptr: *result.as_ref().unwrap_or(&0),
            window: None,
            ok: result.is_ok(),
        });
        result
    }

    fn mem_alloc_locked(
        st: &mut WorldState,
        rank: usize,
        size: usize,
        device: i32,
    ) -> Result<usize, BackendError> {
        if let Some(e) = Self::fault(st, rank, SimOp::MemAlloc) {
            return Err(e);
        }
        if size == 0 || device < 0 {
            return Err(BackendError::InvalidArgument {
                call: "ncclMemAlloc",
                reason: format!("size {size} on device {device}"),
            });
        }
        let len = size
            .checked_next_multiple_of(MEM_GRANULARITY)
            .filter(|&l| l <= VA_CAPACITY)
            .ok_or_else(|| rejected("ncclMemAlloc", format!("{size} bytes: out of memory")))?;
        let r = &mut st.ranks[rank];
        // First fit from the bottom: a freed range is handed out again, as
        // ncclMemAlloc does.
        let mut at = r.base;
        for (&a, alloc) in &r.allocs {
            if a - at >= len {
                break;
            }
            at = a + alloc.len;
        }
        if at + len > r.base + VA_CAPACITY {
            return Err(rejected(
                "ncclMemAlloc",
                format!("{size} bytes: out of memory"),
            ));
        }
        let site = current_site();
        let n = r.site_counts.entry(site.clone()).or_insert(0);
        *n += 1;
        let buffer = BufferId { site, index: *n };
        r.allocs.insert(at, Alloc { len, buffer });
        st.stats.allocs += 1;
        Ok(at)
    }

    fn mem_free(&self, rank: usize, ptr: usize) -> Result<(), BackendError> {
        let mut st = lock(&self.state);
        let result = Self::mem_free_locked(&mut st, rank, ptr);
        st.trace.push(TraceEvent {
            rank,
            op: SimOp::MemFree,
            comm: RawComm(0),
            ptr,
            window: None,
            ok: result.is_ok(),
        });
        result
    }

    fn mem_free_locked(st: &mut WorldState, rank: usize, ptr: usize) -> Result<(), BackendError> {
        if let Some(e) = Self::fault(st, rank, SimOp::MemFree) {
            return Err(e);
        }
        let Some(len) = st.ranks[rank].allocs.get(&ptr).map(|a| a.len) else {
            st.violations.push(Violation::BadFree { rank, ptr });
            return Err(rejected(
                "ncclMemFree",
                format!("{ptr:#x} is not an allocation of rank {rank}"),
            ));
        };
        let end = ptr + len;
        let mut covering: Vec<Window> = st
            .windows
            .iter()
            .filter(|(_, w)| w.rank == rank && w.ptr < end && ptr < w.ptr + w.len)
            .map(|(&raw, w)| Window {
                raw,
                generation: w.generation,
            })
            .collect();
        covering.sort_by_key(|w| w.generation);
        for window in covering {
            st.violations
                .push(Violation::FreedWhileRegistered { rank, ptr, window });
        }
        if st.ranks[rank]
            .inflight
            .iter()
            .any(|&(_, p, s)| p < end && ptr < p + s)
        {
            st.violations
                .push(Violation::FreedDuringRegistration { rank, ptr });
        }
        st.ranks[rank].allocs.remove(&ptr);
        st.stats.frees += 1;
        Ok(())
    }

    fn register(
        &self,
        rank: usize,
        comm: RawComm,
        ptr: usize,
        size: usize,
    ) -> Result<Option<Window>, BackendError> {
        const CALL: &str = "ncclCommWindowRegister";
        // Phase 1: checks, and the call goes in flight.
        let (id, idx, buffer) = {
            let mut st = lock(&self.state);
            st.stats.registers += 1;
            let (id, idx) = match Self::resolve(&mut st, rank, comm, SimOp::Register) {
                Ok(v) => v,
                Err(e) => {
                    trace_reg(&mut st, rank, comm, ptr, None, false);
                    return Err(e);
                }
            };
            Self::enter(&mut st, id, idx, CALL);
            let checked = Self::check_buffer(&mut st, rank, id, ptr, size);
            let buffer = match checked {
                Ok(b) => b,
                Err(e) => {
                    // The call still happened on this rank: it counts in the
                    // collective sequence.
                    Self::record_collective(&mut st, id, idx, RegEntry { size, buffer: None });
                    Self::leave(&mut st, id, idx, CALL);
                    trace_reg(&mut st, rank, comm, ptr, None, false);
                    return Err(e);
                }
            };
            st.ranks[rank].inflight.push((id, ptr, size));
            (id, idx, buffer)
        };
        // Phase 2: in flight, no lock held.
        if let Some(hook) = self.hook() {
            hook(&SimCall {
                rank,
                op: SimOp::Register,
                comm,
                comm_id: id,
                ptr,
                size,
                window: None,
            });
        }
        // Phase 3: the outcome.
        let mut st = lock(&self.state);
        let inflight = &mut st.ranks[rank].inflight;
        if let Some(i) = inflight.iter().position(|&e| e == (id, ptr, size)) {
            inflight.remove(i);
        }
        let fault = Self::fault(&mut st, rank, SimOp::Register);
        Self::record_collective(&mut st, id, idx, RegEntry { size, buffer });
        Self::leave(&mut st, id, idx, CALL);
        if let Some(e) = fault {
            trace_reg(&mut st, rank, comm, ptr, None, false);
            return Err(e);
        }
        if !Self::still_live(&st, comm, id, idx) {
            trace_reg(&mut st, rank, comm, ptr, None, false);
            return Err(destroyed_in_flight(CALL, comm));
        }
        let symmetric = st.comms.get(&id).is_some_and(|c| c.symmetric);
        if !symmetric {
            trace_reg(&mut st, rank, comm, ptr, None, true);
            return Ok(None);
        }
        let raw = match st.free_window_raws.pop() {
            Some(r) => r,
            None => {
                let r = st.next_window_raw;
                st.next_window_raw += HANDLE_STRIDE;
                r
            }
        };
        let generation = st.next_generation;
        st.next_generation += 1;
        st.windows.insert(
            raw,
            WinInfo {
                generation,
                comm: id,
                rank,
                ptr,
                len: size,
            },
        );
        st.stats.windows_issued += 1;
        let w = Window { raw, generation };
        trace_reg(&mut st, rank, comm, ptr, Some(w), true);
        Ok(Some(w))
    }

    /// Alignment, ownership and duplicate checks of a registration.
    fn check_buffer(
        st: &mut WorldState,
        rank: usize,
        id: u64,
        ptr: usize,
        size: usize,
    ) -> Result<Option<BufferId>, BackendError> {
        const CALL: &str = "ncclCommWindowRegister";
        if ptr % WINDOW_ALIGN != 0 {
            st.violations.push(Violation::Misaligned {
                comm: id,
                rank,
                ptr,
            });
            return Err(rejected(CALL, format!("{ptr:#x} is not 4096-byte aligned")));
        }
        let end = ptr.checked_add(size).filter(|_| size > 0);
        let owner = end.and_then(|end| {
            st.ranks[rank]
                .allocs
                .range(..=ptr)
                .next_back()
                .filter(|(&a, alloc)| end <= a + alloc.len)
                .map(|(_, alloc)| alloc.buffer.clone())
        });
        let Some(buffer) = owner else {
            st.violations.push(Violation::UnknownBuffer {
                comm: id,
                rank,
                ptr,
                size,
            });
            return Err(rejected(
                CALL,
                format!("[{ptr:#x}, +{size}) is not device memory of rank {rank}"),
            ));
        };
        let end = ptr + size;
        let dup = st
            .windows
            .iter()
            .filter(|(_, w)| w.comm == id && w.rank == rank && w.ptr < end && ptr < w.ptr + w.len)
            .map(|(&raw, w)| Window {
                raw,
                generation: w.generation,
            })
            .min_by_key(|w| w.generation);
        if let Some(existing) = dup {
            // NCCL accepts it and makes a second window: so does the sim.
            st.violations.push(Violation::DuplicateRegistration {
                comm: id,
                rank,
                ptr,
                existing,
            });
        }
        Ok(Some(buffer))
    }

    /// Appends a registration to the member's collective sequence and
    /// compares it with the other members' at the same position.
    fn record_collective(st: &mut WorldState, id: u64, idx: usize, entry: RegEntry) {
        let Some(c) = st.comms.get_mut(&id) else {
            return;
        };
        let index = c.members[idx].regs.len();
        let me = c.members[idx].rank;
        let reference = c
            .members
            .iter()
            .enumerate()
            .find(|(i, m)| *i != idx && m.regs.len() > index)
            .map(|(_, m)| (m.rank, m.regs[index].clone()));
        c.members[idx].regs.push(entry.clone());
        let Some((first_rank, first)) = reference else {
            return;
        };
        let what = if first.size != entry.size {
            Some(Mismatch::Size {
                first: first.size,
                other: entry.size,
            })
        } else if first.buffer != entry.buffer {
            Some(Mismatch::Order {
                first: first.buffer,
                other: entry.buffer,
            })
        } else {
            None
        };
        if let Some(what) = what {
            st.violations.push(Violation::CollectiveMismatch {
                comm: id,
                index,
                ranks: (first_rank, me),
                what,
            });
        }
    }

    fn deregister(&self, rank: usize, comm: RawComm, window: Window) -> Result<(), BackendError> {
        const CALL: &str = "ncclCommWindowDeregister";
        let (id, idx) = {
            let mut st = lock(&self.state);
            st.stats.deregisters += 1;
            let r = Self::resolve(&mut st, rank, comm, SimOp::Deregister);
            let Ok((id, idx)) = r else {
                trace_dereg(&mut st, rank, comm, window, false);
                return r.map(drop);
            };
            Self::enter(&mut st, id, idx, CALL);
            (id, idx)
        };
        if let Some(hook) = self.hook() {
            hook(&SimCall {
                rank,
                op: SimOp::Deregister,
                comm,
                comm_id: id,
                ptr: 0,
                size: 0,
                window: Some(window),
            });
        }
        let mut st = lock(&self.state);
        let result = if Self::still_live(&st, comm, id, idx) {
            Self::deregister_locked(&mut st, rank, id, window)
        } else {
            Err(destroyed_in_flight(CALL, comm))
        };
        Self::leave(&mut st, id, idx, CALL);
        trace_dereg(&mut st, rank, comm, window, result.is_ok());
        result
    }

    fn deregister_locked(
        st: &mut WorldState,
        rank: usize,
        id: u64,
        window: Window,
    ) -> Result<(), BackendError> {
        const CALL: &str = "ncclCommWindowDeregister";
        if let Some(e) = Self::fault(st, rank, SimOp::Deregister) {
            return Err(e);
        }
        let live = st
            .windows
            .get(&window.raw)
            .filter(|w| w.generation == window.generation)
            .map(|w| (w.comm, w.rank));
        match live {
            None => {
                st.violations.push(Violation::DoubleDeregister {
                    comm: id,
                    rank,
                    window,
                });
                Err(rejected(CALL, format!("{window:?} is not registered")))
            }
            Some((owner, wrank)) if owner != id || wrank != rank => {
                st.violations.push(Violation::WrongComm {
                    rank,
                    window,
                    registered_on: owner,
                    called_on: id,
                });
                Err(rejected(
                    CALL,
                    format!("{window:?} belongs to comm {owner}, not {id}"),
                ))
            }
            Some(_) => {
                st.windows.remove(&window.raw);
                st.free_window_raws.push(window.raw);
                st.stats.windows_deregistered += 1;
                Ok(())
            }
        }
    }
}

fn trace_reg(
    st: &mut WorldState,
    rank: usize,
    comm: RawComm,
    ptr: usize,
    window: Option<Window>,
    ok: bool,
) {
    st.trace.push(TraceEvent {
        rank,
        op: SimOp::Register,
        comm,
        ptr,
        window,
        ok,
    });
}

fn trace_dereg(st: &mut WorldState, rank: usize, comm: RawComm, window: Window, ok: bool) {
    st.trace.push(TraceEvent {
        rank,
        op: SimOp::Deregister,
        comm,
        ptr: 0,
        window: Some(window),
        ok,
    });
}

/// Reports members of comm `id` whose registration counts differ (once per
/// comm).
fn check_counts(st: &mut WorldState, id: u64) {
    let Some(c) = st.comms.get_mut(&id) else {
        return;
    };
    if c.count_reported {
        return;
    }
    let counts: Vec<(usize, usize)> = c.members.iter().map(|m| (m.rank, m.regs.len())).collect();
    if counts.windows(2).any(|w| w[0].1 != w[1].1) {
        c.count_reported = true;
        st.violations
            .push(Violation::CollectiveCountMismatch { comm: id, counts });
    }
}

/// The [`Backend`] of one simulated rank.
#[derive(Clone)]
pub struct SimBackend {
    world: Arc<SimWorld>,
    rank: usize,
}

impl fmt::Debug for SimBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimBackend")
            .field("rank", &self.rank)
            .finish_non_exhaustive()
    }
}

impl SimBackend {
    /// The rank this backend simulates.
    pub fn rank_id(&self) -> usize {
        self.rank
    }

    /// The world it belongs to.
    pub fn world(&self) -> &Arc<SimWorld> {
        &self.world
    }
}

impl Backend for SimBackend {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn mem_alloc(&self, size: usize, device: i32) -> Result<usize, BackendError> {
        self.world.mem_alloc(self.rank, size, device)
    }

    fn mem_free(&self, ptr: usize) -> Result<(), BackendError> {
        self.world.mem_free(self.rank, ptr)
    }

    fn comm_window_register(
        &self,
        comm: RawComm,
        ptr: usize,
        size: usize,
        _flags: i32,
    ) -> Result<Option<Window>, BackendError> {
        self.world.register(self.rank, comm, ptr, size)
    }

    fn comm_window_deregister(&self, comm: RawComm, window: Window) -> Result<(), BackendError> {
        self.world.deregister(self.rank, comm, window)
    }
}
