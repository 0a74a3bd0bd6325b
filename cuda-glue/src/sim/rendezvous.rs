//! Calls that block until the other ranks come: the all-reduce of the
//! agreement and the comm split, each a *meeting* that the members of a
//! comm join in the order of their calls (a member's `k`-th rendezvous
//! meets the others' `k`-th, as NCCL pairs collectives by order). Also
//! what ends a waiting call: `ncclCommAbort`, the deadline of a
//! non-blocking comm's call (whose action aborts it, on the calling
//! thread), an injected stall, and the test's [`SimWorld::release_all`].
//!
//! A meeting completes when every member has joined it and none has
//! left it (timed out, or been aborted): a rank that gives up never
//! releases its peers, which wait until their own deadlines, as NCCL gives
//! no promise that a peer's abort ends anyone else's call.
//!
//! A call on a *blocking* comm ignores its [`Wait`]: nothing releases it
//! but its comm's abort from another thread (recorded as
//! [`Violation::AbortDuringCall`]) or [`SimWorld::release_all`]. The
//! split's child is always non-blocking, and so is the split call.

use std::sync::MutexGuard;
use std::time::Duration;

use super::calls::SimOp;
use super::violation::Violation;
use super::world::WorldState;
use super::{rejected, SimWorld};
use crate::backend::{AtDeadline, BackendError, CommProgress, RawComm, Wait, MAX_AGREEMENT_WORDS};
use crate::util::lock;

/// The longest a waiting call sleeps before it looks again (a wake-up is
/// also sent on every change that could end a wait).
const NAP: Duration = Duration::from_millis(20);

/// One rendezvous of a comm's members.
pub(super) struct Meeting {
    op: SimOp,
    /// Each member's input (indexed like the comm's members).
    inputs: Vec<Option<Vec<u64>>>,
    /// Set once it completed (or failed): what every member gets.
    outcome: Option<Result<Outcome, String>>,
    /// Members that took the outcome.
    taken: usize,
    /// A member left before it completed: it never completes.
    abandoned: bool,
}

/// What a completed meeting gives its members.
#[derive(Clone)]
enum Outcome {
    /// The element-wise maximum of the inputs.
    Reduced(Vec<u64>),
    /// The child comm's handles, one per member (a member's share: its
    /// own).
    Split(Vec<RawComm>),
}

/// Why a waiting call ended without its outcome.
enum Ended {
    /// The member was aborted (by another thread, or by the deadline
    /// action on this one).
    Aborted,
    /// The deadline action aborted the comm (or the wait gives up).
    TimedOut,
    /// The test released every waiting call.
    Released,
}

impl SimWorld {
    /// Arms a stall: the next `op` (register, deregister, all-reduce,
    /// split) made through this member's handle never completes until the
    /// member is aborted (a non-blocking comm's deadline does it) or the
    /// test calls [`release_all`](Self::release_all). Arm every member's
    /// handle for a rendezvous that nobody completes; arm one to make that
    /// rank's call hang while its peers wait for it.
    pub fn stall_next(&self, comm: RawComm, op: SimOp) -> Result<(), BackendError> {
        let mut st = lock(&self.state);
        let Some(&(id, idx)) = st.handles.get(&comm.0) else {
            return Err(rejected(
                "stall_next",
                format!("{comm:?} is not a live comm"),
            ));
        };
        if let Some(m) = st.member_mut(id, idx) {
            m.stalls.push(op);
        }
        Ok(())
    }

    /// Arms a skip: the next all-reduce made through this member's handle
    /// returns at once with the member's own words, as if the member were
    /// alone: a rank whose pass went ahead without its group's agreement
    /// (it ran its pass outside the group, so it counts one pass more than
    /// its peers). The peers' all-reduce it should have met waits for its
    /// next one. Only [`SimOp::AllReduce`] can be skipped.
    pub fn skip_next(&self, comm: RawComm, op: SimOp) -> Result<(), BackendError> {
        if op != SimOp::AllReduce {
            return Err(rejected("skip_next", format!("{op:?} cannot be skipped")));
        }
        let mut st = lock(&self.state);
        let Some(&(id, idx)) = st.handles.get(&comm.0) else {
            return Err(rejected(
                "skip_next",
                format!("{comm:?} is not a live comm"),
            ));
        };
        if let Some(m) = st.member_mut(id, idx) {
            m.skips.push(op);
        }
        Ok(())
    }

    /// Ends every call the simulator holds waiting (stalled calls and
    /// rendezvous that cannot complete) with an error. A test's escape
    /// hatch, so that a failing variant ends instead of hanging; the
    /// calls it ends are not NCCL outcomes.
    pub fn release_all(&self) {
        lock(&self.state).release_epoch += 1;
        self.changed.notify_all();
    }

    /// What `ncclGetVersion` answers from now on (default 22809). From
    /// 23000 (2.30) ranks may register different sizes in one collective
    /// registration, and the simulator stops reporting it.
    pub fn set_nccl_version(&self, version: i32) {
        lock(&self.state).version = version;
    }

    pub(super) fn nccl_version(&self) -> i32 {
        lock(&self.state).version
    }

    /// `ncclAllReduce(words, ncclUint64, ncclMax)` by `rank` on `comm`.
    pub(super) fn all_reduce(
        &self,
        rank: usize,
        comm: RawComm,
        words: &mut [u64],
        wait: &Wait<'_>,
    ) -> Result<(), BackendError> {
        if words.is_empty() || words.len() > MAX_AGREEMENT_WORDS {
            return Err(BackendError::InvalidArgument {
                call: SimOp::AllReduce.call(),
                reason: format!("{} words", words.len()),
            });
        }
        match self.meet(rank, comm, SimOp::AllReduce, words.to_vec(), wait)? {
            Outcome::Reduced(v) => {
                words.copy_from_slice(&v);
                Ok(())
            }
            Outcome::Split(_) => Err(rejected(SimOp::AllReduce.call(), "met a split")),
        }
    }

    /// `ncclCommSplit(parent, 0, rank, blocking = 0)` by `rank`.
    pub(super) fn split(
        &self,
        rank: usize,
        parent: RawComm,
        wait: &Wait<'_>,
    ) -> Result<RawComm, BackendError> {
        match self.meet(rank, parent, SimOp::Split, Vec::new(), wait)? {
            Outcome::Split(mine) => mine
                .first()
                .copied()
                .ok_or_else(|| rejected(SimOp::Split.call(), "no child handle for this rank")),
            Outcome::Reduced(_) => Err(rejected(SimOp::Split.call(), "met an all-reduce")),
        }
    }

    /// `ncclCommAbort` by `rank`: the member's calls end, its windows are
    /// freed (no deregistration may follow), its handle is gone.
    pub(super) fn abort(&self, rank: usize, comm: RawComm) -> Result<(), BackendError> {
        let mut st = lock(&self.state);
        let (id, idx) = st.resolve(rank, comm, SimOp::Abort)?;
        st.abort_member(comm, id, idx);
        st.trace(rank, SimOp::Abort, comm, 0, None, true);
        drop(st);
        self.changed.notify_all();
        Ok(())
    }

    /// `ncclCommGetAsyncError` by `rank`: the simulator's calls complete
    /// inside the call, so a live comm is always ready.
    pub(super) fn async_error(
        &self,
        rank: usize,
        comm: RawComm,
    ) -> Result<CommProgress, BackendError> {
        lock(&self.state).resolve(rank, comm, SimOp::AsyncError)?;
        Ok(CommProgress::Ready)
    }

    /// `ncclCommFinalize` + `ncclCommDestroy` of a comm the glue made.
    pub(super) fn release_comm(&self, rank: usize, comm: RawComm) -> Result<(), BackendError> {
        let mut st = lock(&self.state);
        st.resolve(rank, comm, SimOp::Destroy)?;
        let r = st.destroy_member(comm);
        drop(st);
        self.changed.notify_all();
        r
    }

    /// Checks that `comm` is a live comm of `rank` (the agreement's setup).
    pub(super) fn check_comm(&self, rank: usize, comm: RawComm) -> Result<(), BackendError> {
        lock(&self.state).resolve(rank, comm, SimOp::AllReduce)?;
        Ok(())
    }

    /// Joins the member's next meeting on `comm` with `input` and waits for
    /// it as the comm's mode and `wait` say.
    fn meet(
        &self,
        rank: usize,
        comm: RawComm,
        op: SimOp,
        input: Vec<u64>,
        wait: &Wait<'_>,
    ) -> Result<Outcome, BackendError> {
        let call = op.call();
        let mut st = lock(&self.state);
        let (id, idx) = st.resolve(rank, comm, op)?;
        if st.take_skip(id, idx, op) {
            st.trace(rank, op, comm, 0, None, true);
            return Ok(Outcome::Reduced(input));
        }
        st.enter(id, idx, call);
        let stalled = st.take_stall(id, idx, op);
        let number = if stalled {
            None
        } else {
            let (n, completed) = st.join(id, idx, op, input);
            if completed {
                self.changed.notify_all();
            }
            Some(n)
        };
        // The split's child is non-blocking, and so is the split.
        let blocking = op != SimOp::Split && st.comms.get(&id).is_some_and(|c| c.blocking);
        let ended = self.wait_for(st, id, idx, blocking, wait, |st| {
            number.and_then(|n| st.take_outcome(id, n, idx))
        });
        let mut st = lock(&self.state);
        st.leave(id, idx, call);
        let result = match ended {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(why)) => Err(rejected(call, why)),
            Err(e) => {
                if let Some(n) = number {
                    st.abandon(id, n);
                }
                Err(match e {
                    Ended::Aborted => BackendError::Aborted { call, comm },
                    Ended::TimedOut => wait.timeout(call, comm),
                    Ended::Released => rejected(call, "released by the test (release_all)"),
                })
            }
        };
        st.trace(rank, op, comm, 0, None, result.is_ok());
        drop(st);
        self.changed.notify_all();
        result
    }

    /// Runs `stall`'s wait for a stalled register or deregister: the call
    /// never completes; it ends when the member is aborted, at the
    /// deadline of a non-blocking comm, or at `release_all`.
    pub(super) fn hold_stalled(
        &self,
        id: u64,
        idx: usize,
        call: &'static str,
        comm: RawComm,
        wait: &Wait<'_>,
    ) -> BackendError {
        let st = lock(&self.state);
        let blocking = st.comms.get(&id).is_some_and(|c| c.blocking);
        let ended = self.wait_for(st, id, idx, blocking, wait, |_| None::<()>);
        match ended {
            Ok(()) | Err(Ended::Released) => rejected(call, "released by the test (release_all)"),
            Err(Ended::Aborted) => BackendError::Aborted { call, comm },
            Err(Ended::TimedOut) => wait.timeout(call, comm),
        }
    }

    /// Waits until `done` gives a value, the member is aborted, the test
    /// releases every call, or (a non-blocking comm only) the deadline's
    /// action aborts. The action runs without the world's lock (it calls
    /// back into the simulator to abort).
    fn wait_for<'s, T>(
        &'s self,
        mut st: MutexGuard<'s, WorldState>,
        id: u64,
        idx: usize,
        blocking: bool,
        wait: &Wait<'_>,
        mut done: impl FnMut(&mut WorldState) -> Option<T>,
    ) -> Result<T, Ended> {
        let epoch = st.release_epoch;
        let mut deadline_on = !blocking && wait.deadline().is_some();
        loop {
            if let Some(v) = done(&mut st) {
                return Ok(v);
            }
            if st.member(id, idx).is_none_or(|m| m.aborted) {
                return Err(Ended::Aborted);
            }
            if st.release_epoch != epoch {
                return Err(Ended::Released);
            }
            let nap = match wait.remaining() {
                Some(r) if deadline_on && r.is_zero() => {
                    drop(st);
                    let answer = wait.check();
                    st = lock(&self.state);
                    if answer == Some(AtDeadline::Aborted) {
                        return Err(Ended::TimedOut);
                    }
                    deadline_on = false; // reported: wait on, as a blocking call
                    continue;
                }
                Some(r) if deadline_on => r.min(NAP),
                _ => NAP,
            };
            st = self
                .changed
                .wait_timeout(st, nap)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
    }
}

impl WorldState {
    /// Consumes an armed stall of `op` on the member, if any.
    pub(super) fn take_stall(&mut self, id: u64, idx: usize, op: SimOp) -> bool {
        let Some(m) = self.member_mut(id, idx) else {
            return false;
        };
        match m.stalls.iter().position(|&s| s == op) {
            Some(i) => {
                m.stalls.remove(i);
                true
            }
            None => false,
        }
    }

    /// Consumes an armed skip of `op` on the member, if any.
    fn take_skip(&mut self, id: u64, idx: usize, op: SimOp) -> bool {
        let Some(m) = self.member_mut(id, idx) else {
            return false;
        };
        match m.skips.iter().position(|&s| s == op) {
            Some(i) => {
                m.skips.remove(i);
                true
            }
            None => false,
        }
    }

    /// Puts the member's input into its next meeting; completes the
    /// meeting if it was the last. Returns the meeting's number and
    /// whether it completed now.
    fn join(&mut self, id: u64, idx: usize, op: SimOp, input: Vec<u64>) -> (u64, bool) {
        let Some(c) = self.comms.get_mut(&id) else {
            return (u64::MAX, false);
        };
        let n = c.members[idx].rendezvous;
        c.members[idx].rendezvous += 1;
        let members = c.members.len();
        let meeting = c.meetings.entry(n).or_insert_with(|| Meeting {
            op,
            inputs: vec![None; members],
            outcome: None,
            taken: 0,
            abandoned: false,
        });
        meeting.inputs[idx] = Some(input);
        let ready = !meeting.abandoned
            && meeting.inputs.iter().all(Option::is_some)
            && !c.members.iter().any(|m| m.aborted);
        if ready {
            self.complete(id, n, op);
        }
        (n, ready)
    }

    /// Computes a full meeting's outcome (recording a mismatch).
    fn complete(&mut self, id: u64, n: u64, op: SimOp) {
        let Some(c) = self.comms.get_mut(&id) else {
            return;
        };
        let Some(m) = c.meetings.get_mut(&n) else {
            return;
        };
        let inputs: Vec<Vec<u64>> = m.inputs.iter().flatten().cloned().collect();
        let len = inputs[0].len();
        let outcome = if m.op != op {
            Err(format!("{} met {}", m.op.call(), op.call()))
        } else if inputs.iter().any(|v| v.len() != len) {
            let lens: Vec<usize> = inputs.iter().map(Vec::len).collect();
            Err(format!("{} of different lengths {lens:?}", op.call()))
        } else {
            Ok(())
        };
        let outcome = match outcome {
            Err(what) => {
                self.violations.push(Violation::RendezvousMismatch {
                    comm: id,
                    index: n,
                    what: what.clone(),
                });
                Err(what)
            }
            Ok(()) if op == SimOp::Split => {
                let ranks: Vec<usize> = c.members.iter().map(|m| m.rank).collect();
                let symmetric = c.symmetric;
                Ok(Outcome::Split(self.create_comm(&ranks, symmetric, false)))
            }
            Ok(()) => {
                let mut out = vec![0u64; len];
                for v in &inputs {
                    for (o, x) in out.iter_mut().zip(v) {
                        *o = (*o).max(*x);
                    }
                }
                self.stats.all_reduces += 1;
                Ok(Outcome::Reduced(out))
            }
        };
        if let Some(m) = self.comms.get_mut(&id).and_then(|c| c.meetings.get_mut(&n)) {
            m.outcome = Some(outcome);
        }
    }

    /// The member's share of a completed meeting (removed once every
    /// member took it).
    fn take_outcome(&mut self, id: u64, n: u64, idx: usize) -> Option<Result<Outcome, String>> {
        let c = self.comms.get_mut(&id)?;
        let members = c.members.len();
        let m = c.meetings.get_mut(&n)?;
        let out = match m.outcome.as_ref()? {
            // Each member gets its own handle of the child.
            Ok(Outcome::Split(handles)) => Ok(Outcome::Split(vec![handles[idx]])),
            other => other.clone(),
        };
        m.taken += 1;
        if m.taken == members {
            c.meetings.remove(&n);
        }
        Some(out)
    }

    /// A member left meeting `n` before it completed.
    fn abandon(&mut self, id: u64, n: u64) {
        if let Some(m) = self.comms.get_mut(&id).and_then(|c| c.meetings.get_mut(&n)) {
            if m.outcome.is_none() {
                m.abandoned = true;
            }
        }
    }

    /// `ncclCommAbort` of member `idx` of comm `id`, named by `comm`.
    fn abort_member(&mut self, comm: RawComm, id: u64, idx: usize) {
        let Some(c) = self.comms.get(&id) else {
            return;
        };
        let m = &c.members[idx];
        let rank = m.rank;
        if c.blocking {
            if let Some(&call) = m.in_call.first() {
                self.violations.push(Violation::AbortDuringCall {
                    comm: id,
                    rank,
                    call,
                });
            }
        }
        // NCCL frees the member's windows inside the abort.
        for w in self.windows_of(rank, Some(id), None) {
            self.windows.remove(&w.raw);
            self.window_handles.give_back(w.raw);
            self.stats.windows_aborted += 1;
        }
        if let Some(m) = self.member_mut(id, idx) {
            m.aborted = true;
            m.alive = false;
        }
        self.handles.remove(&comm.0);
        self.aborted_handles.insert(comm.0, (id, idx));
        self.comm_handles.give_back(comm.0);
        self.stats.aborts += 1;
        self.remove_if_gone(id);
    }
}
