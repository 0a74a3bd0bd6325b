//! Simulated comms: creation over some ranks (one raw handle per member,
//! reused after destroy like `ncclComm_t` addresses) and destroy.

use std::collections::BTreeMap;

use super::violation::Violation;
use super::world::{CommState, Member, WorldState};
use super::{rejected, SimWorld};
use crate::backend::{BackendError, RawComm};
use crate::util::lock;

impl SimWorld {
    /// Creates a comm over `ranks` (distinct, in range) with symmetric
    /// support, and returns one raw handle per member, in the order given.
    /// Handle values of destroyed comms are reused.
    pub fn comm_create(&self, ranks: &[usize]) -> Result<Vec<RawComm>, BackendError> {
        self.comm_create_with(ranks, true, true)
    }

    /// Like [`comm_create`](Self::comm_create), for a non-blocking comm
    /// (`ncclConfig_t.blocking = 0`): its waits honour deadlines, and it
    /// may be aborted by the thread that polls it.
    pub fn comm_create_nonblocking(&self, ranks: &[usize]) -> Result<Vec<RawComm>, BackendError> {
        self.comm_create_with(ranks, true, false)
    }

    /// Like [`comm_create`](Self::comm_create), for a comm without symmetric
    /// support: its registrations succeed with a null window (NCCL 2.29+).
    pub fn comm_create_without_symmetric(
        &self,
        ranks: &[usize],
    ) -> Result<Vec<RawComm>, BackendError> {
        self.comm_create_with(ranks, false, true)
    }

    fn comm_create_with(
        &self,
        ranks: &[usize],
        symmetric: bool,
        blocking: bool,
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
        Ok(lock(&self.state).create_comm(ranks, symmetric, blocking))
    }

    /// Whether a live comm handle names a blocking comm.
    pub fn is_blocking(&self, comm: RawComm) -> Option<bool> {
        let st = lock(&self.state);
        let &(id, _) = st.handles.get(&comm.0)?;
        st.comms.get(&id).map(|c| c.blocking)
    }

    /// The simulator's id of a live comm handle.
    pub fn comm_id(&self, comm: RawComm) -> Option<u64> {
        lock(&self.state).handles.get(&comm.0).map(|&(id, _)| id)
    }

    /// Destroys one member's handle (`ncclCommDestroy`). Windows still
    /// registered on it are dropped and reported as a violation (detach
    /// first), and so is a call still in flight on it. When the last member
    /// is gone, the count check runs.
    pub fn comm_destroy(&self, comm: RawComm) -> Result<(), BackendError> {
        lock(&self.state).destroy_member(comm)
    }
}

impl WorldState {
    /// A new comm over `ranks` (checked by the caller): one handle each.
    pub(super) fn create_comm(
        &mut self,
        ranks: &[usize],
        symmetric: bool,
        blocking: bool,
    ) -> Vec<RawComm> {
        let id = self.next_comm_id;
        self.next_comm_id += 1;
        let mut members = Vec::with_capacity(ranks.len());
        let mut out = Vec::with_capacity(ranks.len());
        for (i, &rank) in ranks.iter().enumerate() {
            let handle = self.comm_handles.take();
            self.aborted_handles.remove(&handle);
            self.handles.insert(handle, (id, i));
            members.push(Member::new(rank));
            out.push(RawComm(handle));
        }
        self.comms.insert(
            id,
            CommState {
                symmetric,
                blocking,
                members,
                count_reported: false,
                meetings: BTreeMap::new(),
            },
        );
        out
    }

    /// `ncclCommDestroy` of one member's handle.
    pub(super) fn destroy_member(&mut self, comm: RawComm) -> Result<(), BackendError> {
        if let Some(&(id, idx)) = self.aborted_handles.get(&comm.0) {
            let rank = self.member(id, idx).map_or(usize::MAX, |m| m.rank);
            self.violations.push(Violation::CallAfterAbort {
                comm: id,
                rank,
                call: "ncclCommDestroy",
            });
            return Err(BackendError::Aborted {
                call: "ncclCommDestroy",
                comm,
            });
        }
        let Some((id, idx)) = self.handles.remove(&comm.0) else {
            return Err(rejected(
                "ncclCommDestroy",
                format!("{comm:?} is not a live comm"),
            ));
        };
        self.comm_handles.give_back(comm.0);
        let member = &self.comms[&id].members[idx];
        let rank = member.rank;
        if let Some(&first) = member.in_call.first() {
            // The destroy is a second call on (comm, rank).
            self.violations.push(Violation::ConcurrentCalls {
                comm: id,
                rank,
                first,
                second: "ncclCommDestroy",
            });
        }
        self.drop_windows(id, rank);
        if let Some(m) = self.member_mut(id, idx) {
            m.alive = false;
        }
        self.remove_if_gone(id);
        Ok(())
    }

    /// Removes comm `id` once every member is destroyed or aborted, after
    /// the count check.
    pub(super) fn remove_if_gone(&mut self, id: u64) {
        let all_gone = self
            .comms
            .get(&id)
            .is_some_and(|c| c.members.iter().all(|m| !m.alive));
        if all_gone {
            self.check_counts(id);
            self.comms.remove(&id);
        }
    }

    /// Drops the windows a destroyed member still had, reporting them.
    fn drop_windows(&mut self, id: u64, rank: usize) {
        let stale = self.windows_of(rank, Some(id), None);
        if stale.is_empty() {
            return;
        }
        self.violations.push(Violation::DestroyWithWindows {
            comm: id,
            rank,
            windows: stale.len(),
        });
        for w in stale {
            self.windows.remove(&w.raw);
            self.window_handles.give_back(w.raw);
        }
    }
}
