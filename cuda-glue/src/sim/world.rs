//! The simulated world's state, one value behind one mutex: every rank's
//! memory, the comms and their members, the live windows, and what was
//! recorded (violations, trace, faults, figures). The checks and updates
//! of each call are methods of [`WorldState`], in the files of their
//! concern.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

use super::calls::{SimOp, TraceEvent};
use super::faults::Fault;
use super::rendezvous::Meeting;
use super::site::BufferId;
use super::violation::Violation;
use super::{rejected, SimStats};
use crate::backend::{BackendError, RawComm, Window};

/// First raw comm handle value.
const COMM_HANDLE_BASE: usize = 0x5500_0000;
/// First raw window handle value.
const WINDOW_HANDLE_BASE: usize = 0x6600_0000;
/// The NCCL version the simulator answers by default (2.28.9).
const DEFAULT_VERSION: i32 = 22809;

/// Handle values as NCCL hands them out: a freed one comes back first.
pub(super) struct Handles {
    free: Vec<usize>,
    next: usize,
}

impl Handles {
    /// Distance between two handle values.
    const STRIDE: usize = 0x40;

    fn starting_at(base: usize) -> Self {
        Handles {
            free: Vec::new(),
            next: base,
        }
    }

    /// A handle value: the last one given back, else a new one.
    pub(super) fn take(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            let h = self.next;
            self.next += Self::STRIDE;
            h
        })
    }

    /// A value that may be handed out again.
    pub(super) fn give_back(&mut self, h: usize) {
        self.free.push(h);
    }
}

pub(super) struct Alloc {
    pub(super) len: usize,
    pub(super) buffer: BufferId,
}

pub(super) struct RankState {
    pub(super) base: usize,
    pub(super) allocs: BTreeMap<usize, Alloc>,
    pub(super) site_counts: HashMap<Option<Arc<str>>, u64>,
    /// Registrations in flight: (comm, ptr, size).
    pub(super) inflight: Vec<(u64, usize, usize)>,
}

#[derive(Clone)]
pub(super) struct RegEntry {
    pub(super) size: usize,
    pub(super) buffer: Option<BufferId>,
}

pub(super) struct Member {
    pub(super) rank: usize,
    pub(super) alive: bool,
    /// Aborted (`ncclCommAbort`): its handle is gone, its windows freed.
    pub(super) aborted: bool,
    /// Calls in flight on this comm and rank, by name.
    pub(super) in_call: Vec<&'static str>,
    pub(super) regs: Vec<RegEntry>,
    /// Rendezvous (all-reduce, split) this member has joined: the next one
    /// meets the others' call of the same number.
    pub(super) rendezvous: u64,
    /// Armed stalls: the member's next call of each op here never
    /// completes until the member is aborted.
    pub(super) stalls: Vec<SimOp>,
    /// Armed skips: the member's next all-reduce returns its own input at
    /// once, without meeting the others.
    pub(super) skips: Vec<SimOp>,
}

impl Member {
    pub(super) fn new(rank: usize) -> Self {
        Member {
            rank,
            alive: true,
            aborted: false,
            in_call: Vec::new(),
            regs: Vec::new(),
            rendezvous: 0,
            stalls: Vec::new(),
            skips: Vec::new(),
        }
    }
}

pub(super) struct CommState {
    pub(super) symmetric: bool,
    /// Made blocking (every call blocks its thread) or non-blocking (calls
    /// may be polled, and their waits honour deadlines).
    pub(super) blocking: bool,
    pub(super) members: Vec<Member>,
    pub(super) count_reported: bool,
    /// Open rendezvous by number (see `rendezvous.rs`).
    pub(super) meetings: BTreeMap<u64, Meeting>,
}

impl CommState {
    /// Whether a member of the comm was aborted: its collective counts
    /// then say nothing.
    pub(super) fn any_aborted(&self) -> bool {
        self.members.iter().any(|m| m.aborted)
    }
}

pub(super) struct WinInfo {
    pub(super) generation: u64,
    pub(super) comm: u64,
    pub(super) rank: usize,
    pub(super) ptr: usize,
    pub(super) len: usize,
}

pub(super) struct WorldState {
    pub(super) ranks: Vec<RankState>,
    pub(super) comms: BTreeMap<u64, CommState>,
    /// Live raw comm handle → (comm id, member index).
    pub(super) handles: HashMap<usize, (u64, usize)>,
    /// Handles of aborted members (until the value is handed out again):
    /// a call on one is a use after free.
    pub(super) aborted_handles: HashMap<usize, (u64, usize)>,
    pub(super) comm_handles: Handles,
    pub(super) next_comm_id: u64,
    pub(super) windows: HashMap<usize, WinInfo>,
    pub(super) window_handles: Handles,
    pub(super) next_generation: u64,
    pub(super) violations: Vec<Violation>,
    pub(super) trace: Vec<TraceEvent>,
    pub(super) faults: Vec<Fault>,
    pub(super) stats: SimStats,
    /// Bumped by [`SimWorld::release_all`](super::SimWorld::release_all):
    /// every call waiting when it changes ends with an error.
    pub(super) release_epoch: u64,
    /// What `ncclGetVersion` answers.
    pub(super) version: i32,
}

impl WorldState {
    /// `nranks` ranks whose address spaces start at `base(rank)`.
    pub(super) fn new(nranks: usize, base: impl Fn(usize) -> usize) -> Self {
        let ranks = (0..nranks)
            .map(|r| RankState {
                base: base(r),
                allocs: BTreeMap::new(),
                site_counts: HashMap::new(),
                inflight: Vec::new(),
            })
            .collect();
        WorldState {
            ranks,
            comms: BTreeMap::new(),
            handles: HashMap::new(),
            aborted_handles: HashMap::new(),
            comm_handles: Handles::starting_at(COMM_HANDLE_BASE),
            next_comm_id: 1,
            windows: HashMap::new(),
            window_handles: Handles::starting_at(WINDOW_HANDLE_BASE),
            next_generation: 1,
            violations: Vec::new(),
            trace: Vec::new(),
            faults: Vec::new(),
            stats: SimStats::default(),
            release_epoch: 0,
            version: DEFAULT_VERSION,
        }
    }

    /// The live windows of `rank`, on comm `comm` if given, overlapping
    /// `range` if given; oldest first.
    pub(super) fn windows_of(
        &self,
        rank: usize,
        comm: Option<u64>,
        range: Option<Range<usize>>,
    ) -> Vec<Window> {
        let mut v: Vec<Window> = self
            .windows
            .iter()
            .filter(|(_, w)| w.rank == rank && comm.is_none_or(|c| w.comm == c))
            .filter(|(_, w)| {
                range
                    .as_ref()
                    .is_none_or(|r| w.ptr < r.end && r.start < w.ptr + w.len)
            })
            .map(|(&raw, w)| Window {
                raw,
                generation: w.generation,
            })
            .collect();
        v.sort_by_key(|w| w.generation);
        v
    }

    /// Resolves a comm handle used by `rank` for `op`, recording violations.
    pub(super) fn resolve(
        &mut self,
        rank: usize,
        comm: RawComm,
        op: SimOp,
    ) -> Result<(u64, usize), BackendError> {
        let call = op.call();
        if comm.is_null() {
            self.violations.push(Violation::NullComm { rank, call });
            return Err(BackendError::NullComm { call });
        }
        let Some(&(id, idx)) = self.handles.get(&comm.0) else {
            if let Some(&(id, _)) = self.aborted_handles.get(&comm.0) {
                self.violations.push(Violation::CallAfterAbort {
                    comm: id,
                    rank,
                    call,
                });
                return Err(BackendError::Aborted { call, comm });
            }
            self.violations.push(Violation::UnknownComm {
                rank,
                call,
                raw: comm.0,
            });
            return Err(rejected(call, format!("{comm:?} is not a live comm")));
        };
        let owner = self.comms[&id].members[idx].rank;
        if owner != rank {
            self.violations.push(Violation::ForeignComm {
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
    pub(super) fn still_live(&self, comm: RawComm, id: u64, idx: usize) -> bool {
        self.handles.get(&comm.0) == Some(&(id, idx))
    }

    /// Marks a call in flight on (comm, member), reporting a concurrent one.
    pub(super) fn enter(&mut self, id: u64, idx: usize, call: &'static str) {
        let Some(c) = self.comms.get_mut(&id) else {
            return;
        };
        let m = &mut c.members[idx];
        let clash = m.in_call.first().map(|&first| Violation::ConcurrentCalls {
            comm: id,
            rank: m.rank,
            first,
            second: call,
        });
        m.in_call.push(call);
        self.violations.extend(clash);
    }

    /// The call is no longer in flight on (comm, member).
    pub(super) fn leave(&mut self, id: u64, idx: usize, call: &'static str) {
        if let Some(c) = self.comms.get_mut(&id) {
            let calls = &mut c.members[idx].in_call;
            if let Some(i) = calls.iter().position(|&c| c == call) {
                calls.remove(i);
            }
        }
    }

    /// Records a completed call in the trace.
    pub(super) fn trace(
        &mut self,
        rank: usize,
        op: SimOp,
        comm: RawComm,
        ptr: usize,
        window: Option<Window>,
        ok: bool,
    ) {
        self.trace.push(TraceEvent {
            rank,
            op,
            comm,
            ptr,
            window,
            ok,
        });
    }

    /// The figures now.
    pub(super) fn stats(&self) -> SimStats {
        let mut s = self.stats;
        s.live_allocs = self.ranks.iter().map(|r| r.allocs.len()).sum();
        s.live_windows = self.windows.len();
        s.live_comms = self.comms.len();
        s.open_meetings = self.comms.values().map(|c| c.meetings.len()).sum();
        s
    }

    /// The comm and member a live handle names, or `None`.
    pub(super) fn member(&self, id: u64, idx: usize) -> Option<&Member> {
        self.comms.get(&id).and_then(|c| c.members.get(idx))
    }

    /// Mutable [`member`](Self::member).
    pub(super) fn member_mut(&mut self, id: u64, idx: usize) -> Option<&mut Member> {
        self.comms.get_mut(&id).and_then(|c| c.members.get_mut(idx))
    }
}
