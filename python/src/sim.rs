//! `SimWorld`: the glue's simulated multi-rank NCCL, for tests on machines
//! without GPUs: one allocator per rank, ranks driven from Python threads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;

use segment_registry_nccl::sim::{SimOp, SimWorld as RsSimWorld};
use segment_registry_nccl::{Allocator as RsAllocator, Backend, BackendError, RawComm};

use crate::allocator::Allocator;
use crate::errors::SegmentRegistryError;

/// A simulated multi-rank NCCL, for tests on machines without GPUs. Its
/// collective calls block until every member arrives, so drive the ranks
/// from one Python thread each.
#[pyclass(frozen, module = "segment_registry._native")]
pub(crate) struct SimWorld {
    world: Arc<RsSimWorld>,
    /// The rank each raw comm handle belongs to (an abort is a member's).
    owners: Mutex<HashMap<usize, usize>>,
}

fn sim_error(e: BackendError) -> PyErr {
    SegmentRegistryError::new_err(format!("simulated NCCL: {e}"))
}

#[pymethods]
impl SimWorld {
    /// A world of `nranks` ranks.
    #[new]
    fn new(nranks: usize) -> PyResult<Self> {
        if nranks == 0 {
            return Err(PyValueError::new_err("a world has at least one rank"));
        }
        Ok(SimWorld {
            world: RsSimWorld::new(nranks),
            owners: Mutex::new(HashMap::new()),
        })
    }

    /// The number of ranks.
    #[getter]
    fn nranks(&self) -> usize {
        self.world.nranks()
    }

    /// A new allocator over rank `rank`.
    fn rank(&self, rank: usize) -> PyResult<Allocator> {
        let backend = self.world.rank(rank).ok_or_else(|| {
            PyIndexError::new_err(format!("rank {rank} of a world of {}", self.world.nranks()))
        })?;
        Ok(Allocator::own(
            RsAllocator::new(Box::new(backend) as Box<dyn Backend>),
            Arc::clone(&self.world),
        ))
    }

    /// A comm over `ranks`; its raw handle on each of them, in order.
    /// `nonblocking`: its calls honour deadlines and may be aborted.
    /// `symmetric=False`: registrations succeed without a window.
    #[pyo3(signature = (ranks, *, nonblocking = false, symmetric = true))]
    fn comm_create(
        &self,
        ranks: Vec<usize>,
        nonblocking: bool,
        symmetric: bool,
    ) -> PyResult<Vec<usize>> {
        let made = match (nonblocking, symmetric) {
            (false, true) => self.world.comm_create(&ranks),
            (true, true) => self.world.comm_create_nonblocking(&ranks),
            (false, false) => self.world.comm_create_without_symmetric(&ranks),
            (true, false) => {
                return Err(PyValueError::new_err(
                    "a non-blocking comm without symmetric support is not simulated",
                ))
            }
        }
        .map_err(sim_error)?;
        let mut owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        for (raw, rank) in made.iter().zip(&ranks) {
            owners.insert(raw.0, *rank);
        }
        Ok(made.into_iter().map(|c| c.0).collect())
    }

    /// The comm's next registration never completes until it is aborted
    /// (a lost rendezvous).
    fn stall_next_register(&self, comm: usize) -> PyResult<()> {
        self.world
            .stall_next(RawComm(comm), SimOp::Register)
            .map_err(sim_error)
    }

    /// `ncclCommAbort` on the member of a comm whose raw handle is `comm`
    /// (what an owner's abort hook does).
    fn abort(&self, comm: usize) -> PyResult<()> {
        let rank = *self
            .owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&comm)
            .ok_or_else(|| PyValueError::new_err(format!("{comm:#x} is no comm of this world")))?;
        let backend = self.world.rank(rank).ok_or_else(|| {
            PyIndexError::new_err(format!("rank {rank} of a world of {}", self.world.nranks()))
        })?;
        backend.comm_abort(RawComm(comm)).map_err(sim_error)
    }

    /// NCCL rules broken so far, after the end-of-run checks (empty when
    /// every call was legal).
    fn violations(&self) -> Vec<String> {
        self.world
            .verify()
            .iter()
            .map(|v| format!("{v:?}"))
            .collect()
    }
}
