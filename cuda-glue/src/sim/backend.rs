//! [`SimBackend`]: the [`Backend`] of one simulated rank.

use std::fmt;
use std::sync::Arc;

use super::windows::Registration;
use super::SimWorld;
use crate::backend::{Backend, BackendError, RawComm, Window};

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

    fn comm_window_register(
        &self,
        comm: RawComm,
        ptr: usize,
        size: usize,
        _flags: i32,
    ) -> Result<Option<Window>, BackendError> {
        self.world.register(Registration {
            rank: self.rank,
            comm,
            ptr,
            size,
        })
    }

    fn comm_window_deregister(&self, comm: RawComm, window: Window) -> Result<(), BackendError> {
        self.world.deregister(self.rank, comm, window)
    }
}
