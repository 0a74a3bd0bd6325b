//! Window registration and deregistration. Each call is checked and goes in
//! flight under the world's lock, runs the test hook with no lock held,
//! then takes the lock again for its outcome, re-checking that its comm
//! was not destroyed meanwhile.

use super::calls::{SimCall, SimOp};
use super::site::BufferId;
use super::violation::Violation;
use super::world::{RegEntry, WinInfo, WorldState};
use super::{destroyed_in_flight, rejected, SimWorld};
use crate::backend::{BackendError, RawComm, Wait, Window};
use crate::util::lock;

const REGISTER: &str = "ncclCommWindowRegister";
const DEREGISTER: &str = "ncclCommWindowDeregister";

/// What a register call asks for.
#[derive(Clone, Copy)]
pub(super) struct Registration {
    pub(super) rank: usize,
    pub(super) comm: RawComm,
    pub(super) ptr: usize,
    pub(super) size: usize,
}

/// A registration that passed its checks and is in flight on member `idx`
/// of comm `id`.
struct InFlight {
    id: u64,
    idx: usize,
    buffer: Option<BufferId>,
}

impl SimWorld {
    /// Live windows registered through this comm handle.
    pub fn windows_on(&self, comm: RawComm) -> Vec<Window> {
        let st = lock(&self.state);
        let Some(&(id, idx)) = st.handles.get(&comm.0) else {
            return Vec::new();
        };
        let rank = st.comms[&id].members[idx].rank;
        st.windows_of(rank, Some(id), None)
    }

    pub(super) fn register(
        &self,
        call: Registration,
        wait: &Wait<'_>,
    ) -> Result<Option<Window>, BackendError> {
        let (flight, stalled) = {
            let mut st = lock(&self.state);
            let flight = st.begin_register(call)?;
            let stalled = st.take_stall(flight.id, flight.idx, SimOp::Register);
            (flight, stalled)
        };
        self.run_hook(&SimCall {
            rank: call.rank,
            op: SimOp::Register,
            comm: call.comm,
            comm_id: flight.id,
            ptr: call.ptr,
            size: call.size,
            window: None,
        });
        if stalled {
            let e = self.hold_stalled(flight.id, flight.idx, REGISTER, call.comm, wait);
            lock(&self.state).abandon_register(call, flight);
            return Err(e);
        }
        lock(&self.state).finish_register(call, flight)
    }

    pub(super) fn deregister(
        &self,
        rank: usize,
        comm: RawComm,
        window: Window,
        wait: &Wait<'_>,
    ) -> Result<(), BackendError> {
        let (id, idx, stalled) = {
            let mut st = lock(&self.state);
            let (id, idx) = st.begin_deregister(rank, comm, window)?;
            (id, idx, st.take_stall(id, idx, SimOp::Deregister))
        };
        self.run_hook(&SimCall {
            rank,
            op: SimOp::Deregister,
            comm,
            comm_id: id,
            ptr: 0,
            size: 0,
            window: Some(window),
        });
        if stalled {
            let e = self.hold_stalled(id, idx, DEREGISTER, comm, wait);
            let mut st = lock(&self.state);
            st.leave(id, idx, DEREGISTER);
            st.trace(rank, SimOp::Deregister, comm, 0, Some(window), false);
            return Err(e);
        }
        lock(&self.state).finish_deregister(rank, comm, window, (id, idx))
    }

    fn run_hook(&self, call: &SimCall) {
        if let Some(hook) = self.hook() {
            hook(call);
        }
    }
}

impl WorldState {
    /// The checks of a registration; on success it is in flight.
    fn begin_register(&mut self, call: Registration) -> Result<InFlight, BackendError> {
        let Registration {
            rank,
            comm,
            ptr,
            size,
        } = call;
        self.stats.registers += 1;
        let (id, idx) = match self.resolve(rank, comm, SimOp::Register) {
            Ok(v) => v,
            Err(e) => {
                self.trace(rank, SimOp::Register, comm, ptr, None, false);
                return Err(e);
            }
        };
        self.enter(id, idx, REGISTER);
        match self.check_buffer(rank, id, ptr, size) {
            Ok(buffer) => {
                self.ranks[rank].inflight.push((id, ptr, size));
                Ok(InFlight { id, idx, buffer })
            }
            Err(e) => {
                // The call still happened on this rank: it counts in the
                // collective sequence.
                self.record_collective(id, idx, RegEntry { size, buffer: None });
                self.leave(id, idx, REGISTER);
                self.trace(rank, SimOp::Register, comm, ptr, None, false);
                Err(e)
            }
        }
    }

    /// A registration in flight that never completed (stalled, then aborted
    /// or released): it issues nothing and records no collective call
    /// (its comm is gone, or the test gave up on it).
    fn abandon_register(&mut self, call: Registration, f: InFlight) {
        let inflight = &mut self.ranks[call.rank].inflight;
        if let Some(i) = inflight
            .iter()
            .position(|&e| e == (f.id, call.ptr, call.size))
        {
            inflight.remove(i);
        }
        self.leave(f.id, f.idx, REGISTER);
        self.trace(call.rank, SimOp::Register, call.comm, call.ptr, None, false);
    }

    /// The outcome of a registration in flight.
    fn finish_register(
        &mut self,
        call: Registration,
        f: InFlight,
    ) -> Result<Option<Window>, BackendError> {
        let inflight = &mut self.ranks[call.rank].inflight;
        if let Some(i) = inflight
            .iter()
            .position(|&e| e == (f.id, call.ptr, call.size))
        {
            inflight.remove(i);
        }
        let fault = self.fault(call.rank, SimOp::Register);
        let entry = RegEntry {
            size: call.size,
            buffer: f.buffer,
        };
        self.record_collective(f.id, f.idx, entry);
        self.leave(f.id, f.idx, REGISTER);
        let outcome = match fault {
            Some(e) => Err(e),
            None => self.issue_window(call, f.id, f.idx),
        };
        let window = outcome.as_ref().ok().copied().flatten();
        self.trace(
            call.rank,
            SimOp::Register,
            call.comm,
            call.ptr,
            window,
            outcome.is_ok(),
        );
        outcome
    }

    /// A new window for a registration that succeeded: none on a comm
    /// without symmetric support, and none for a comm destroyed while the
    /// call was in flight.
    fn issue_window(
        &mut self,
        call: Registration,
        id: u64,
        idx: usize,
    ) -> Result<Option<Window>, BackendError> {
        if !self.still_live(call.comm, id, idx) {
            return Err(destroyed_in_flight(REGISTER, call.comm));
        }
        if !self.comms.get(&id).is_some_and(|c| c.symmetric) {
            return Ok(None);
        }
        let raw = self.window_handles.take();
        let generation = self.next_generation;
        self.next_generation += 1;
        let info = WinInfo {
            generation,
            comm: id,
            rank: call.rank,
            ptr: call.ptr,
            len: call.size,
        };
        self.windows.insert(raw, info);
        self.stats.windows_issued += 1;
        Ok(Some(Window { raw, generation }))
    }

    /// The checks of a deregistration; on success it is in flight.
    fn begin_deregister(
        &mut self,
        rank: usize,
        comm: RawComm,
        window: Window,
    ) -> Result<(u64, usize), BackendError> {
        self.stats.deregisters += 1;
        match self.resolve(rank, comm, SimOp::Deregister) {
            Ok((id, idx)) => {
                self.enter(id, idx, DEREGISTER);
                Ok((id, idx))
            }
            Err(e) => {
                self.trace(rank, SimOp::Deregister, comm, 0, Some(window), false);
                Err(e)
            }
        }
    }

    /// The outcome of a deregistration in flight on `member` (comm id,
    /// member index).
    fn finish_deregister(
        &mut self,
        rank: usize,
        comm: RawComm,
        window: Window,
        (id, idx): (u64, usize),
    ) -> Result<(), BackendError> {
        let result = if self.still_live(comm, id, idx) {
            self.remove_window(rank, id, window)
        } else {
            Err(destroyed_in_flight(DEREGISTER, comm))
        };
        self.leave(id, idx, DEREGISTER);
        self.trace(
            rank,
            SimOp::Deregister,
            comm,
            0,
            Some(window),
            result.is_ok(),
        );
        result
    }

    /// Removes a live window of comm `id` on `rank`, or reports why not.
    fn remove_window(&mut self, rank: usize, id: u64, window: Window) -> Result<(), BackendError> {
        if let Some(e) = self.fault(rank, SimOp::Deregister) {
            return Err(e);
        }
        let live = self
            .windows
            .get(&window.raw)
            .filter(|w| w.generation == window.generation)
            .map(|w| (w.comm, w.rank));
        match live {
            None => {
                self.violations.push(Violation::DoubleDeregister {
                    comm: id,
                    rank,
                    window,
                });
                Err(rejected(
                    DEREGISTER,
                    format!("{window:?} is not registered"),
                ))
            }
            Some((owner, wrank)) if owner != id || wrank != rank => {
                self.violations.push(Violation::WrongComm {
                    rank,
                    window,
                    registered_on: owner,
                    called_on: id,
                });
                Err(rejected(
                    DEREGISTER,
                    format!("{window:?} belongs to comm {owner}, not {id}"),
                ))
            }
            Some(_) => {
                self.windows.remove(&window.raw);
                self.window_handles.give_back(window.raw);
                self.stats.windows_deregistered += 1;
                Ok(())
            }
        }
    }
}
