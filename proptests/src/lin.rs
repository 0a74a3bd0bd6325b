//! Concurrent histories and a Wing–Gong linearizability checker.
//!
//! A history is, per thread, a sequence of [`Event`]s, each with the clock
//! reading at its call and at its return and what it observed ([`Obs`]).
//! The checker searches for a total order of all events that respects each
//! thread's program order and real time (an event whose return precedes
//! another's call comes first) and in which every event, applied to the
//! sequential [`Model`], yields exactly what was observed. Visited
//! `(progress of each thread, model state)` pairs are memoized (Lowe's
//! refinement of Wing & Gong), so each is explored once.
//!
//! Operations that are not one atomic step in the registry are several
//! events of their thread, sharing the operation's interval:
//!
//! * a pass is its claim of the comm, the moment it reads the end of the
//!   log, a walk that decides each segment of its set ("fixed when it
//!   begins" holds per segment: one the walk has not reached yet can still
//!   be untracked, see `README.md`), then per callback the check that the
//!   comm is still attached, what it does with the callback's window, and
//!   the release of the segment before, and finally the watermark move, one
//!   release per hold it still has, and the end of its busy state; the
//!   intervals between callbacks come from clock readings inside the
//!   callback;
//! * `forget` is its removal from the comm table, the flag that running
//!   passes check, one step per window it takes, and its end; a
//!   forget that holds a segment and then finds the window gone (a racing
//!   untrack claimed it) keeps a *ghost* hold for a moment, which the
//!   checker may place where it explains what the racing untrack saw.
//!
//! Steps with no observation of their own (the walk, the finish releases,
//! ghost holds) are *internal*: the checker may take them whenever the
//! thread's next event could be linearized.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use segment_registry::{CommError, CommId, Segment, TrackError, UntrackError};

use crate::model::{AddOutcome, CbResult, Model, NextStep, StopReason, UntrackOut, Window};
use crate::ops::PassEnd;

/// A global logical clock: every reading is unique and increasing.
#[derive(Debug, Default)]
pub struct Clock(AtomicU64);

impl Clock {
    /// The next reading.
    pub fn now(&self) -> u64 {
        // SeqCst: readings in different threads must agree with real time.
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// What an event did and observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Obs {
    /// `attach(payload)`.
    Attach {
        /// The payload.
        payload: u64,
        /// The id it got.
        result: CommId,
    },
    /// `track(addr, len)`.
    Track {
        /// Start.
        addr: usize,
        /// Length.
        len: usize,
        /// Result.
        result: Result<Segment, TrackError>,
        /// An overlapping track ran concurrently: the registry may reject
        /// either (it "lost an overlap race to a concurrent track").
        excused: bool,
    },
    /// `untrack(addr)`.
    Untrack {
        /// Start.
        addr: usize,
        /// Result (`held`: a hold came with it).
        result: Result<UntrackOut, UntrackError>,
    },
    /// `Hold::release` of the hold on `seg`.
    Release {
        /// The segment.
        seg: Segment,
        /// `true`: last hold, free now.
        result: bool,
    },
    /// `find(addr)`.
    Find {
        /// Any address.
        addr: usize,
        /// Result.
        result: Option<Segment>,
    },
    /// `pending(comm)`.
    Pending {
        /// The comm.
        comm: CommId,
        /// Result.
        result: Result<usize, CommError>,
    },
    /// `forget(comm)`: the detach.
    ForgetBegin {
        /// The comm.
        comm: CommId,
        /// `Err` if it was not attached (then this is the only event).
        result: Result<(), CommError>,
        /// The `free_now` it reported.
        free_now: Vec<Segment>,
    },
    /// `forget(comm)`: the comm is flagged forgotten.
    ForgetFlag {
        /// The comm.
        comm: CommId,
        /// `Forgotten::pass_running`.
        pass_running: bool,
    },
    /// `forget(comm)`: one window taken, with a hold.
    ForgetTake {
        /// The comm.
        comm: CommId,
        /// The segment.
        seg: Segment,
        /// The window.
        window: Window,
    },
    /// `forget(comm)`: the scan is over.
    ForgetEnd {
        /// The comm.
        comm: CommId,
    },
    /// A pass claims its comm.
    PassClaim {
        /// The comm.
        comm: CommId,
        /// `Err` if it could not start (then this is the only event).
        result: Result<(), CommError>,
    },
    /// A pass reads the end of the log.
    PassFixEnd {
        /// The comm.
        comm: CommId,
    },
    /// The check at the top of a pass's loop: `Some(seg)` if the callback
    /// was then called on `seg`, `None` if the loop ended there.
    PassCheck {
        /// The comm.
        comm: CommId,
        /// What followed.
        next: Option<Segment>,
    },
    /// What the pass did with a callback's result.
    PassAdd {
        /// The comm.
        comm: CommId,
        /// The callback's result.
        cb: CbResult,
        /// Whether the window came back in `handed_back`.
        handed_back: bool,
    },
    /// The pass releases the segment before the one just registered.
    PassRelease {
        /// The comm.
        comm: CommId,
    },
    /// The pass moves its watermark.
    PassFinishCursor {
        /// The comm.
        comm: CommId,
    },
    /// The pass ends: what it returned.
    PassUnbusy {
        /// The comm.
        comm: CommId,
        /// How it ended.
        end: PassEnd,
        /// `report.registered`.
        registered: Vec<Segment>,
        /// `report.handed_back`.
        handed_back: Vec<(Segment, CommId, Window)>,
        /// `report.free_now`.
        free_now: Vec<Segment>,
    },
    /// The registry at rest after every thread joined.
    Final {
        /// `segments_by_seq()`.
        by_seq: Vec<Segment>,
        /// `pending` of each comm ever attached.
        pending: Vec<(CommId, Result<usize, CommError>)>,
        /// Windows recorded per attached comm (`stats()`).
        windows: Vec<(CommId, usize)>,
    },
}

/// One event of a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Clock reading before the step could have happened.
    pub call: u64,
    /// Clock reading after it must have happened.
    pub ret: u64,
    /// What it did and saw.
    pub obs: Obs,
}

/// A history: each thread's events in program order.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Threads.
    pub threads: Vec<Vec<Event>>,
}

/// A forget in progress.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct ForgetProgress {
    /// Segments it holds without a window (a racing untrack took it).
    ghosts: Vec<u64>,
    /// Ghost holds that were the last hold.
    freed: Vec<Segment>,
    /// The `free_now` it reported.
    expect_free: Vec<Segment>,
}

/// The checker's state: the model and the forgets in progress.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct LinState {
    model: Model,
    forgets: BTreeMap<CommId, ForgetProgress>,
}

/// Marks the `excused` flag of every rejected track that ran concurrently
/// with a track of an overlapping range.
pub fn mark_excuses(h: &mut History) {
    let tracks: Vec<(u64, u64, usize, usize)> = h
        .threads
        .iter()
        .flatten()
        .filter_map(|e| match e.obs {
            Obs::Track { addr, len, .. } => Some((e.call, e.ret, addr, len)),
            _ => None,
        })
        .collect();
    for e in h.threads.iter_mut().flatten() {
        let (call, ret) = (e.call, e.ret);
        if let Obs::Track {
            addr,
            len,
            result: Err(TrackError::Overlap { .. }),
            excused,
        } = &mut e.obs
        {
            let end = addr.saturating_add(*len);
            *excused = tracks.iter().any(|&(c, r, a, l)| {
                (c, r) != (call, ret)
                    && c < ret
                    && call < r
                    && a < end
                    && *addr < a.saturating_add(l)
            });
        }
    }
}

fn overlaps(s: &Segment, addr: usize, len: usize) -> bool {
    s.addr < addr.saturating_add(len) && addr < s.end()
}

/// Applies one event to the state; `None` if what it observed is not what
/// the model does there.
fn apply(st: &LinState, obs: &Obs) -> Option<LinState> {
    let mut st = st.clone();
    let m = &mut st.model;
    match obs {
        Obs::Attach { payload, result } => {
            if m.attach(*payload) != *result {
                return None;
            }
        }
        Obs::Track {
            addr,
            len,
            result,
            excused,
        } => {
            let before = m.clone();
            let got = m.track(*addr, *len);
            match (got, result) {
                (Ok(a), Ok(b)) if a == *b => {}
                (Err(a), Err(b)) if a == *b => {}
                (
                    Err(TrackError::Overlap { .. }),
                    Err(TrackError::Overlap {
                        other_addr,
                        other_len,
                        ..
                    }),
                ) => {
                    // Any live segment it overlaps may be named.
                    let named = Segment {
                        addr: *other_addr,
                        len: *other_len,
                        seq: 0,
                    };
                    let live = before
                        .segments()
                        .iter()
                        .any(|s| (s.addr, s.len) == (named.addr, named.len));
                    if !(live && overlaps(&named, *addr, *len) || *excused) {
                        return None;
                    }
                }
                (Ok(_), Err(TrackError::Overlap { .. })) if *excused => *m = before,
                _ => return None,
            }
        }
        Obs::Untrack { addr, result } => {
            if m.untrack(*addr) != *result {
                return None;
            }
        }
        Obs::Release { seg, result } => {
            if m.try_release(seg.seq) != Some(*result) {
                return None;
            }
        }
        Obs::Find { addr, result } => {
            if m.find(*addr) != *result {
                return None;
            }
        }
        Obs::Pending { comm, result } => {
            if m.pending(*comm) != *result {
                return None;
            }
        }
        Obs::ForgetBegin {
            comm,
            result,
            free_now,
        } => {
            if m.forget_begin(*comm) != *result {
                return None;
            }
            if result.is_ok() {
                st.forgets.insert(
                    *comm,
                    ForgetProgress {
                        expect_free: free_now.clone(),
                        ..ForgetProgress::default()
                    },
                );
            }
        }
        Obs::ForgetFlag { comm, pass_running } => {
            let (running, orphans) = m.forget_flag(*comm);
            if running != *pass_running || !orphans.0.is_empty() || !orphans.1.is_empty() {
                return None;
            }
        }
        Obs::ForgetTake { comm, seg, window } => {
            if m.segs.get(&seg.seq).map(|s| s.seg) != Some(*seg)
                || m.forget_take(*comm, seg.seq) != Some(*window)
            {
                return None;
            }
        }
        Obs::ForgetEnd { comm } => {
            let p = st.forgets.remove(comm)?;
            if !p.ghosts.is_empty() || p.freed != p.expect_free {
                return None;
            }
        }
        Obs::PassClaim { comm, result } => {
            // Between a forget's two steps, a claim may fail at its lookup
            // (the comm left the table) or get through it (looked up
            // before) and then fail or succeed on the flag.
            let between = m.comms.get(comm).is_some_and(|c| !c.attached);
            let lookup_failed = between && *result == Err(CommError::NotAttached(*comm));
            if !lookup_failed && m.pass_claim(*comm) != *result {
                return None;
            }
        }
        Obs::PassFixEnd { comm } => m.pass_fix_end(*comm),
        Obs::PassCheck { comm, next } => {
            if m.pass_walking(*comm) {
                return None;
            }
            match (m.pass_next(*comm), next) {
                (NextStep::Call(a), Some(b)) if a == *b => {}
                (NextStep::Finish, None) => {}
                _ => return None,
            }
        }
        Obs::PassAdd {
            comm,
            cb,
            handed_back,
        } => {
            let o = m.pass_add(*comm, *cb);
            let stops = matches!(cb, CbResult::Fail(_) | CbResult::Panic);
            if (o == AddOutcome::HandedBack) != *handed_back || (o == AddOutcome::Stopped) != stops
            {
                return None;
            }
        }
        Obs::PassRelease { comm } => {
            m.pass_release(*comm);
        }
        Obs::PassFinishCursor { comm } => m.pass_finish_cursor(*comm),
        Obs::PassUnbusy {
            comm,
            end,
            registered,
            handed_back,
            free_now,
        } => {
            if m.pass_finish_has_release(*comm) {
                return None;
            }
            let p = m.pass_finish_unbusy(*comm);
            let want = match p.stopped {
                None => PassEnd::Ok,
                Some(StopReason::Forgotten) => PassEnd::Forgotten(*comm),
                Some(StopReason::Callback(s, e)) => PassEnd::Callback(s, e),
                Some(StopReason::Panicked(_)) => PassEnd::Panicked,
                // The checker's histories run unchecked passes only.
                Some(StopReason::Unagreed) => return None,
            };
            if want != *end
                || p.report.registered != *registered
                || p.report.handed_back != *handed_back
                || p.report.free_now != *free_now
            {
                return None;
            }
        }
        Obs::Final {
            by_seq,
            pending,
            windows,
        } => {
            if m.segments_by_seq() != *by_seq
                || pending.iter().any(|(c, r)| m.pending(*c) != *r)
                || windows.iter().any(|(c, n)| m.windows_of(*c) != *n)
                || !st.forgets.is_empty()
            {
                return None;
            }
        }
    }
    Some(st)
}

/// The internal steps thread `t` may take before its next event `obs`.
fn internal_steps(st: &LinState, obs: &Obs, next_events: &[Option<&Obs>]) -> Vec<LinState> {
    let mut out = Vec::new();
    match obs {
        Obs::PassCheck { comm, .. } if st.model.pass_walking(*comm) => {
            let mut s = st.clone();
            s.model.pass_walk(*comm);
            out.push(s);
        }
        Obs::PassUnbusy { comm, .. } if st.model.pass_finish_has_release(*comm) => {
            let mut s = st.clone();
            s.model.pass_finish_release(*comm);
            out.push(s);
        }
        Obs::ForgetTake { comm, .. } | Obs::ForgetEnd { comm } => {
            if st.model.comms.get(comm).is_some_and(|c| !c.forgotten) {
                return out;
            }
            let Some(p) = st.forgets.get(comm) else {
                return out;
            };
            // Release a ghost hold.
            for (i, &seq) in p.ghosts.iter().enumerate() {
                let mut s = st.clone();
                let last = s.model.try_release(seq).expect("ghost holds");
                let seg_now = st.model.segs[&seq].seg;
                let p = s.forgets.get_mut(comm).expect("in progress");
                p.ghosts.remove(i);
                if last {
                    p.freed.push(seg_now);
                }
                out.push(s);
            }
            // Take a ghost hold where it explains something: an untrack
            // about to report a hold nobody has, or a free_now of forget.
            let pass_set: Vec<u64> = st
                .model
                .pass(*comm)
                .map(|p| p.set.iter().map(|s| s.seq).collect())
                .unwrap_or_default();
            for s in st.model.segs.values().filter(|s| s.live) {
                let seq = s.seg.seq;
                if p.ghosts.contains(&seq)
                    || !(s.windows.contains_key(comm) || pass_set.contains(&seq))
                {
                    continue;
                }
                let untrack_needs = next_events.iter().flatten().any(|o| {
                    matches!(o, Obs::Untrack { result: Ok(u), .. }
                        if u.held && u.segment.seq == seq && s.holds == 0)
                });
                let free_needs = p.expect_free.iter().any(|f| f.seq == seq)
                    && !p.freed.iter().any(|f| f.seq == seq);
                if untrack_needs || free_needs {
                    let mut n = st.clone();
                    n.model.segs.get_mut(&seq).expect("live").holds += 1;
                    n.forgets
                        .get_mut(comm)
                        .expect("in progress")
                        .ghosts
                        .push(seq);
                    out.push(n);
                }
            }
        }
        _ => {}
    }
    out
}

/// Why a history is not linearizable.
#[derive(Debug)]
pub struct NotLinearizable {
    /// The history, formatted.
    pub history: String,
    /// The longest order of events found that the model accepts.
    pub longest_prefix: Vec<(usize, usize)>,
    /// States explored.
    pub explored: usize,
}

impl std::fmt::Display for NotLinearizable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "history is not linearizable ({} states explored)",
            self.explored
        )?;
        writeln!(f, "{}", self.history)?;
        writeln!(
            f,
            "longest accepted order (thread, event): {:?}",
            self.longest_prefix
        )
    }
}

struct Search<'h> {
    h: &'h History,
    memo: HashSet<(Vec<u16>, LinState)>,
    path: Vec<(usize, usize)>,
    best: Vec<(usize, usize)>,
    budget: usize,
}

impl Search<'_> {
    fn dfs(&mut self, pos: &mut Vec<u16>, st: &LinState) -> bool {
        if pos
            .iter()
            .zip(&self.h.threads)
            .all(|(&p, t)| p as usize == t.len())
        {
            return true;
        }
        if !self.memo.insert((pos.clone(), st.clone())) {
            return false;
        }
        assert!(
            self.memo.len() <= self.budget,
            "linearizability search exceeded {} states",
            self.budget
        );
        let heads: Vec<Option<&Event>> = pos
            .iter()
            .zip(&self.h.threads)
            .map(|(&p, t)| t.get(p as usize))
            .collect();
        let min_ret = heads
            .iter()
            .flatten()
            .map(|e| e.ret)
            .min()
            .expect("some left");
        let next_obs: Vec<Option<&Obs>> = heads.iter().map(|e| e.map(|e| &e.obs)).collect();
        for t in 0..heads.len() {
            let Some(e) = heads[t] else { continue };
            if e.call > min_ret {
                continue;
            }
            if let Some(n) = apply(st, &e.obs) {
                pos[t] += 1;
                self.path.push((t, pos[t] as usize - 1));
                if self.path.len() > self.best.len() {
                    self.best = self.path.clone();
                }
                if self.dfs(pos, &n) {
                    return true;
                }
                self.path.pop();
                pos[t] -= 1;
            }
            for n in internal_steps(st, &e.obs, &next_obs) {
                if self.dfs(pos, &n) {
                    return true;
                }
            }
        }
        false
    }
}

/// Checks `h` against the model starting from `init`. On success returns
/// the number of states explored.
pub fn check(init: &Model, h: &History) -> Result<usize, NotLinearizable> {
    let mut s = Search {
        h,
        memo: HashSet::new(),
        path: Vec::new(),
        best: Vec::new(),
        budget: 2_000_000,
    };
    let st = LinState {
        model: init.clone(),
        forgets: BTreeMap::new(),
    };
    let mut pos = vec![0u16; h.threads.len()];
    if s.dfs(&mut pos, &st) {
        Ok(s.memo.len())
    } else {
        Err(NotLinearizable {
            history: format_history(h),
            longest_prefix: s.best,
            explored: s.memo.len(),
        })
    }
}

/// One line per event: thread, index, interval, observation.
pub fn format_history(h: &History) -> String {
    let mut out = String::new();
    for (t, evs) in h.threads.iter().enumerate() {
        for (i, e) in evs.iter().enumerate() {
            writeln!(
                out,
                "  t{t}#{i:<3} [{:>5}, {:>5}] {:?}",
                e.call, e.ret, e.obs
            )
            .unwrap();
        }
    }
    out
}
