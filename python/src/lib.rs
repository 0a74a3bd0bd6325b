//! `segment_registry._native`: the Python API of the segment registry's
//! NCCL glue, and, in the same shared library, the C entry points of
//! `include/segment_registry.h` that PyTorch's `CUDAPluggableAllocator`
//! loads. Both act on one process-wide allocator, so a segment PyTorch's
//! pool allocates through `segreg_alloc` is the one Python registers and
//! looks up.

mod allocator;
mod errors;
mod reports;
mod sim;

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use segment_registry_nccl::capi::{self, BackendKind};

use crate::allocator::Allocator;
use crate::errors::{init_error, NotInitializedError, SegmentRegistryError};

/// The C entry points, exported from this library (see the header).
mod c_abi {
    segment_registry_nccl::export_c_abi!();
}

/// Initialises the process-wide allocator (`"nccl"`: real NCCL and CUDA;
/// `"sim"`: a one-rank simulated NCCL) and returns it; the same one as the
/// C entry points use. Calling it again with the same backend returns it.
#[pyfunction]
#[pyo3(signature = (backend = "nccl"))]
fn init(py: Python<'_>, backend: &str) -> PyResult<Allocator> {
    let kind = match backend {
        "nccl" => BackendKind::Nccl,
        "sim" => BackendKind::Sim,
        other => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "backend must be \"nccl\" or \"sim\", not {other:?}"
            )))
        }
    };
    let a = py.detach(|| capi::init(kind)).map_err(init_error)?;
    Ok(Allocator::global(a))
}

/// The process-wide allocator; raises `NotInitializedError` before
/// `init`.
#[pyfunction]
fn global_allocator() -> PyResult<Allocator> {
    capi::global_allocator()
        .map(Allocator::global)
        .map_err(NotInitializedError::new_err)
}

/// A one-rank comm of the process-wide simulated backend; returns its raw
/// handle. `nonblocking`: its calls honour deadlines and may be aborted;
/// `symmetric=False`: registrations succeed without a window.
#[pyfunction]
#[pyo3(signature = (*, nonblocking = false, symmetric = true))]
fn sim_comm_create(nonblocking: bool, symmetric: bool) -> PyResult<usize> {
    let w = capi::global_sim_world().map_err(NotInitializedError::new_err)?;
    let made = match (nonblocking, symmetric) {
        (false, true) => w.comm_create(&[0]),
        (true, true) => w.comm_create_nonblocking(&[0]),
        (false, false) => w.comm_create_without_symmetric(&[0]),
        (true, false) => {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "a non-blocking comm without symmetric support is not simulated",
            ))
        }
    };
    let made = made.map_err(|e| SegmentRegistryError::new_err(e.to_string()))?;
    Ok(made.first().map_or(0, |c| c.0))
}

/// Destroys a comm made by `sim_comm_create` (detach it first).
#[pyfunction]
fn sim_comm_destroy(comm: usize) -> PyResult<()> {
    let w = capi::global_sim_world().map_err(NotInitializedError::new_err)?;
    w.comm_destroy(segment_registry_nccl::RawComm(comm))
        .map_err(|e| SegmentRegistryError::new_err(e.to_string()))
}

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::add_all(m)?;
    m.add_class::<Allocator>()?;
    m.add_class::<reports::PassSummary>()?;
    m.add_class::<reports::CommInfo>()?;
    m.add_class::<sim::SimWorld>()?;
    m.add_function(wrap_pyfunction!(init, m)?)?;
    m.add_function(wrap_pyfunction!(global_allocator, m)?)?;
    m.add_function(wrap_pyfunction!(sim_comm_create, m)?)?;
    m.add_function(wrap_pyfunction!(sim_comm_destroy, m)?)?;
    m.add(
        "C_ENTRY_POINTS",
        PyTuple::new(m.py(), capi::ENTRY_POINTS.iter().copied())?,
    )?;
    let fields = capi::SegregStats::FIELDS.iter().map(|(n, _)| *n);
    m.add("STATS_FIELDS", PyTuple::new(m.py(), fields)?)?;
    m.add("DEADLINE_ENV", segment_registry_nccl::DEADLINE_ENV)?;
    Ok(())
}
