//! [`SimBackend`]: the [`Backend`] of one simulated rank.

use std::fmt;
use std::sync::Arc;

use super::windows::Registration;
use super::SimWorld;
use crate::backend::{Backend, BackendError, CommProgress, RawComm, Wait, Window};

/// The [`Backend`] of one simulated rank.
#[derive(Clone)]
pub struct SimBackend {
    pub(super) world: Arc<SimWorld>,
    pub(super) rank: usize,
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

    fn nccl_version(&self) -> i32 {
        self.world.nccl_version()
    }

    fn comm_window_register_within(
        &self,
        comm: RawComm,
        ptr: usize,
        size: usize,
        _flags: i32,
        wait: &Wait<'_>,
    ) -> Result<Option<Window>, BackendError> {
        let call = Registration {
            rank: self.rank,
            comm,
            ptr,
            size,
        };
        self.world.register(call, wait)
    }

    fn comm_window_deregister_within(
        &self,
        comm: RawComm,
        window: Window,
        wait: &Wait<'_>,
    ) -> Result<(), BackendError> {
        self.world.deregister(self.rank, comm, window, wait)
    }

    fn comm_split(&self, parent: RawComm, wait: &Wait<'_>) -> Result<RawComm, BackendError> {
        self.world.split(self.rank, parent, wait)
    }

    fn comm_async_error(&self, comm: RawComm) -> Result<CommProgress, BackendError> {
        self.world.async_error(self.rank, comm)
    }

    fn comm_abort(&self, comm: RawComm) -> Result<(), BackendError> {
        self.world.abort(self.rank, comm)
    }

    fn comm_release(&self, comm: RawComm, _wait: &Wait<'_>) -> Result<(), BackendError> {
        self.world.release_comm(self.rank, comm)
    }

    fn all_reduce_setup(&self, comm: RawComm) -> Result<(), BackendError> {
        self.world.check_comm(self.rank, comm)
    }

    fn all_reduce_max_u64(
        &self,
        comm: RawComm,
        words: &mut [u64],
        wait: &Wait<'_>,
    ) -> Result<(), BackendError> {
        self.world.all_reduce(self.rank, comm, words, wait)
    }
}
