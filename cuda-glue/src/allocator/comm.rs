//! Attached comms: each one's entry (gate, pass lock, state, failed
//! deregistrations), attaching, and finding an entry.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use segment_registry::CommId;

use super::checked::{Agreement, AttachOptions, CommOwner};
use super::free::Deferred;
use super::Allocator;
use crate::backend::{Backend, RawComm};
use crate::error::AttachError;
use crate::gate::Gate;
use crate::util::{lock, read, write};

pub(super) const ACTIVE: u8 = 0;
pub(super) const FAILED: u8 = 1;
pub(super) const DETACHING: u8 = 2;
pub(super) const DETACHED: u8 = 3;
pub(super) const ABORTED: u8 = 4;

/// The state of an attached comm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommState {
    /// Passes allowed.
    Active,
    /// A registration failed: passes return
    /// [`RegisterError::Failed`](crate::RegisterError::Failed); detach it.
    Failed,
    /// A detach began and could not deregister every window yet; call
    /// detach again.
    Detaching,
    /// A call on it reached its deadline and the comm was aborted (by the
    /// glue, or through its owner's hook): NCCL freed it and its windows,
    /// which left the accounting without an NCCL call. No call is made on
    /// it again; passes return
    /// [`RegisterError::Aborted`](crate::RegisterError::Aborted); detach
    /// it to forget it (no NCCL call). Its raw handle is no longer
    /// attached: a new comm at the same address may be attached.
    Aborted,
}

pub(super) struct CommEntry {
    pub(super) id: CommId,
    pub(super) raw: RawComm,
    pub(super) gate: Gate<Deferred>,
    /// Held by a pass for its whole run, and by detach.
    pub(super) pass_lock: Mutex<()>,
    pub(super) state: AtomicU8,
    pub(super) failure: Mutex<Option<String>>,
    /// Deregistrations that failed; retried by the next pass and by detach.
    pub(super) stuck: Mutex<Vec<Deferred>>,
    pub(super) saw_window: AtomicBool,
    pub(super) saw_null_window: AtomicBool,
    /// Who may end a call on the comm at its deadline, and how.
    pub(super) owner: CommOwner,
    /// Every collective call on the comm ends by this long after it began
    /// (or, on a blocking borrowed comm, is reported).
    pub(super) deadline: Duration,
    /// The private agreement comm of a checked comm.
    pub(super) agreement: Option<Agreement>,
    /// In the raw index (until detach or abort takes it out, once).
    pub(super) indexed: AtomicBool,
}

impl CommEntry {
    fn new(id: CommId, raw: RawComm, opts: AttachOptions, agreement: Option<Agreement>) -> Self {
        CommEntry {
            deadline: opts.resolved_deadline(),
            owner: opts.owner,
            agreement,
            id,
            raw,
            gate: Gate::new(),
            pass_lock: Mutex::new(()),
            state: AtomicU8::new(ACTIVE),
            failure: Mutex::new(None),
            stuck: Mutex::new(Vec::new()),
            saw_window: AtomicBool::new(false),
            saw_null_window: AtomicBool::new(false),
            indexed: AtomicBool::new(true),
        }
    }

    pub(super) fn state(&self) -> u8 {
        // SeqCst: rare transitions; no reason to be clever.
        self.state.load(Ordering::SeqCst)
    }

    /// The state as the public figures name it.
    pub(super) fn public_state(&self) -> CommState {
        match self.state() {
            ACTIVE => CommState::Active,
            FAILED => CommState::Failed,
            ABORTED => CommState::Aborted,
            _ => CommState::Detaching,
        }
    }

    /// Marks the comm aborted (from any state but detached), with why.
    /// `false` if it was aborted (or detached) already.
    pub(super) fn set_aborted(&self, reason: String) -> bool {
        let mut f = lock(&self.failure);
        // SeqCst: rare transition, read by every later call on the comm.
        let r = self
            .state
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| {
                (s != ABORTED && s != DETACHED).then_some(ABORTED)
            });
        if r.is_ok() {
            *f = Some(reason);
        }
        r.is_ok()
    }

    pub(super) fn fail(&self, reason: String) {
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

impl<B: Backend> Allocator<B> {
    /// Attaches a comm by its raw handle, as today: unchecked, borrowed
    /// and blocking (never aborted), with the deadline of
    /// `SEGREG_DEADLINE_MS` for stall reports. The id returned is never
    /// reused; the comm's first pass registers every live segment. Makes
    /// no NCCL call. See [`attach_with`](Self::attach_with) for checked
    /// comms and deadlines.
    pub fn attach(&self, comm: RawComm) -> Result<CommId, AttachError> {
        self.attach_with(comm, AttachOptions::new())
    }

    /// Attaches a comm with `opts`. A checked attach splits a private
    /// agreement comm from `comm` (a collective on `comm`: every rank
    /// attaches it at the same program point, on the thread that issues
    /// that group's collectives), sets up its buffer and warms its
    /// all-reduce up; if any of that fails, or ends at the deadline,
    /// nothing is attached ([`AttachError::Agreement`]).
    pub fn attach_with(&self, comm: RawComm, opts: AttachOptions) -> Result<CommId, AttachError> {
        if comm.is_null() {
            return Err(AttachError::NullComm);
        }
        self.refuse_attached(&read(&self.comms), comm)?;
        let agreement = if opts.is_checked() {
            Some(self.open_agreement(comm, &opts)?)
        } else {
            None
        };
        let mut table = write(&self.comms);
        if let Err(e) = self.refuse_attached(&table, comm) {
            drop(table);
            if let Some(a) = agreement {
                self.close_agreement(&a, opts.resolved_deadline());
            }
            return Err(e);
        }
        let id = self.registry.attach(comm);
        table.insert(id, Arc::new(CommEntry::new(id, comm, opts, agreement)));
        self.raw_index.insert(comm, id);
        Ok(id)
    }

    /// `AlreadyAttached` if a live entry of `table` has the handle.
    fn refuse_attached(
        &self,
        table: &std::collections::BTreeMap<CommId, Arc<CommEntry>>,
        comm: RawComm,
    ) -> Result<(), AttachError> {
        match table
            .values()
            .find(|e| e.raw == comm && e.state() != ABORTED)
        {
            Some(e) => Err(AttachError::AlreadyAttached {
                raw: comm,
                comm: e.id,
            }),
            None => Ok(()),
        }
    }

    /// The id of an attached raw handle (an aborted comm's handle is no
    /// longer attached).
    pub fn comm_id(&self, comm: RawComm) -> Option<CommId> {
        read(&self.comms)
            .values()
            .find(|e| e.raw == comm && e.state() != ABORTED)
            .map(|e| e.id)
    }

    /// [`comm_id`](Self::comm_id), else the last aborted comm that had the
    /// handle and is not detached yet (so that the C ABI can detach it by
    /// its handle).
    pub fn comm_id_or_aborted(&self, comm: RawComm) -> Option<CommId> {
        self.comm_id(comm).or_else(|| {
            read(&self.comms)
                .values()
                .rev()
                .find(|e| e.raw == comm)
                .map(|e| e.id)
        })
    }

    /// Attached comms, in attach order.
    pub fn comms(&self) -> Vec<CommId> {
        read(&self.comms).keys().copied().collect()
    }

    pub(super) fn entry(&self, comm: CommId) -> Option<Arc<CommEntry>> {
        read(&self.comms).get(&comm).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> CommEntry {
        CommEntry::new(CommId(1), RawComm(0x10), AttachOptions::new(), None)
    }

    /// A comm is marked aborted once, with the first reason; a detached
    /// one never (its handle may belong to a new comm by then).
    #[test]
    fn a_comm_is_marked_aborted_once_and_never_after_its_detach() {
        let e = entry();
        assert_eq!(e.public_state(), CommState::Active);
        assert!(e.set_aborted("first".into()));
        assert!(!e.set_aborted("second".into()), "once");
        assert_eq!(lock(&e.failure).as_deref(), Some("first"));
        assert_eq!(e.public_state(), CommState::Aborted);

        let d = entry();
        // SeqCst: as the entry's own transitions.
        d.state.store(DETACHED, Ordering::SeqCst);
        assert!(!d.set_aborted("late".into()));
        assert_eq!(lock(&d.failure).as_deref(), None);
    }
}
