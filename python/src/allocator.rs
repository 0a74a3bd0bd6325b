//! `Allocator`: the glue's allocator as a Python object, either the
//! process-wide one (behind the C entry points and PyTorch's pool) or one
//! of its own (a simulated rank).

use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use segment_registry_nccl::capi::{global_sim_world, GlobalAllocator, SegregStats};
use segment_registry_nccl::{AbortHook, AttachOptions, CommId, RawComm, RegisterError};

use crate::errors::{
    alloc_error, attach_error, detach_error, free_error, register_error, window_error,
    NotAttachedError,
};
use crate::reports::{CommInfo, PassSummary};

/// Which allocator a Python `Allocator` is.
enum Which {
    /// The process-wide one.
    Global(&'static GlobalAllocator),
    /// One of its own, over one rank of a simulated world.
    Own {
        alloc: Arc<GlobalAllocator>,
        /// The simulated world's violation count, for the statistics.
        world: Arc<segment_registry_nccl::sim::SimWorld>,
    },
}

/// An allocator of NCCL memory whose segments register with comms.
///
/// Get the process-wide one with `init` or `global_allocator` (the one
/// behind the C entry points and PyTorch's pool), or one per simulated
/// rank with `SimWorld.rank`. Every method that can wait releases the GIL.
#[pyclass(frozen, module = "segment_registry._native")]
pub(crate) struct Allocator {
    which: Which,
}

impl Allocator {
    /// The process-wide allocator.
    pub(crate) fn global(alloc: &'static GlobalAllocator) -> Self {
        Allocator {
            which: Which::Global(alloc),
        }
    }

    /// An allocator of its own over a simulated rank of `world`.
    pub(crate) fn own(
        alloc: GlobalAllocator,
        world: Arc<segment_registry_nccl::sim::SimWorld>,
    ) -> Self {
        Allocator {
            which: Which::Own {
                alloc: Arc::new(alloc),
                world,
            },
        }
    }

    fn get(&self) -> &GlobalAllocator {
        match &self.which {
            Which::Global(a) => a,
            Which::Own { alloc, .. } => alloc,
        }
    }

    /// The id of the attached raw comm `comm` (an aborted one not yet
    /// detached included).
    fn id(&self, comm: usize) -> PyResult<CommId> {
        self.get().comm_id_or_aborted(RawComm(comm)).ok_or_else(|| {
            NotAttachedError::new_err(format!(
                "comm {comm:#x} is not attached (never, or detached): attach it first"
            ))
        })
    }
}

#[pymethods]
impl Allocator {
    /// `"nccl"` or `"sim"`.
    #[getter]
    fn backend(&self) -> &'static str {
        self.get().backend().name()
    }

    /// Whether this is the process-wide allocator.
    #[getter]
    fn is_global(&self) -> bool {
        matches!(self.which, Which::Global(_))
    }

    /// Allocates `size` bytes with `ncclMemAlloc` on `device` and tracks
    /// the segment; returns its address.
    #[pyo3(signature = (size, device = 0))]
    fn alloc(&self, py: Python<'_>, size: usize, device: i32) -> PyResult<usize> {
        let a = self.get();
        py.detach(|| a.alloc(size, device)).map_err(alloc_error)
    }

    /// Deregisters the segment's windows, then `ncclMemFree`.
    fn free(&self, py: Python<'_>, ptr: usize) -> PyResult<()> {
        let a = self.get();
        py.detach(|| a.free(ptr)).map(|_| ()).map_err(free_error)
    }

    /// Attaches a raw `ncclComm_t`. `checked`: its passes agree before
    /// they register (collective: every rank attaches at the same point).
    /// `deadline` (seconds): every collective call on it ends by then
    /// (default: the environment's `SEGREG_DEADLINE_MS`, else 10 minutes).
    /// `owned`: the comm is non-blocking and the glue may abort it at a
    /// deadline. `abort`: the owner's abort of a borrowed non-blocking
    /// comm, called with the raw comm by the thread whose call reached the
    /// deadline.
    #[pyo3(signature = (comm, *, checked = false, deadline = None, owned = false, abort = None))]
    fn attach(
        &self,
        py: Python<'_>,
        comm: usize,
        checked: bool,
        deadline: Option<f64>,
        owned: bool,
        abort: Option<Py<PyAny>>,
    ) -> PyResult<()> {
        let mut opts = AttachOptions::new();
        if checked {
            opts = opts.checked();
        }
        if let Some(d) = deadline {
            let d = Duration::try_from_secs_f64(d)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    PyValueError::new_err(format!("deadline must be positive seconds, not {d}"))
                })?;
            opts = opts.deadline(d);
        }
        match (owned, abort) {
            (true, Some(_)) => {
                return Err(PyValueError::new_err(
                    "owned=True and abort= exclude each other: an owned comm is aborted by the \
                     glue, a borrowed one through its owner's hook",
                ))
            }
            (true, None) => opts = opts.owned(),
            (false, Some(hook)) => opts = opts.borrowed_nonblocking(abort_hook(hook)),
            (false, None) => {}
        }
        let a = self.get();
        py.detach(|| a.attach_with(RawComm(comm), opts))
            .map(|_| ())
            .map_err(attach_error)
    }

    /// Detaches `comm` (collective for a checked comm); returns the
    /// windows it deregistered. Call it before the comm is destroyed.
    fn detach(&self, py: Python<'_>, comm: usize) -> PyResult<usize> {
        let id = self.id(comm)?;
        let a = self.get();
        py.detach(|| a.detach(id))
            .map(|r| r.deregistered)
            .map_err(detach_error)
    }

    /// Registers what `comm` lacks (collective: every rank calls it at the
    /// same point).
    fn register(&self, py: Python<'_>, comm: usize) -> PyResult<PassSummary> {
        let id = self.id(comm)?;
        let a = self.get();
        let s = py.detach(|| a.register(id)).map_err(register_error)?;
        Ok(PassSummary::new(comm, &s))
    }

    /// One pass per attached comm, in attach order: each a `PassSummary`,
    /// or the exception its pass ended with (not raised).
    fn register_all(&self, py: Python<'_>) -> PyResult<Vec<Py<PyAny>>> {
        let a = self.get();
        let results = py.detach(|| a.register_all());
        let raw_of = |id: CommId| {
            a.stats()
                .comms
                .iter()
                .find(|c| c.comm == id)
                .map_or(0, |c| c.raw.0)
        };
        results
            .into_iter()
            .map(|(id, r)| match r {
                Ok(s) => Ok(Py::new(py, PassSummary::new(raw_of(id), &s))?.into_any()),
                Err(e) => Ok(register_error(e).into_value(py).into_any()),
            })
            .collect()
    }

    /// Takes part in `comm`'s checked pass without registering (this rank
    /// cannot register now): every rank's pass then ends with
    /// `DivergedError` at once. Returns that `DivergedError` (not
    /// raised); raises if this rank could not take part.
    fn abstain(&self, py: Python<'_>, comm: usize) -> PyResult<Py<PyAny>> {
        let id = self.id(comm)?;
        let a = self.get();
        match py.detach(|| a.abstain(id)) {
            e @ RegisterError::Diverged(_) => Ok(register_error(e).into_value(py).into_any()),
            e => Err(register_error(e)),
        }
    }

    /// `(window, offset)` of `[ptr, ptr + size)` for NCCL's device API
    /// (`ncclGetLocalPointer(window, offset)`); lock-free.
    fn window_of(&self, ptr: usize, size: usize, comm: usize) -> PyResult<(usize, usize)> {
        let hit = self
            .get()
            .window_of_raw(RawComm(comm), ptr, size)
            .map_err(window_error)?;
        Ok((hit.window.raw, hit.offset))
    }

    /// Whether `comm` is attached (an aborted one not yet detached counts).
    fn is_attached(&self, comm: usize) -> bool {
        self.get().comm_id_or_aborted(RawComm(comm)).is_some()
    }

    /// The attached comms, in attach order.
    fn comms(&self) -> Vec<CommInfo> {
        self.get().stats().comms.iter().map(CommInfo::new).collect()
    }

    /// Every statistic of `STATS_FIELDS`, by name.
    fn stats_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let violations = match &self.which {
            Which::Global(_) => global_sim_world().map_or(0, |w| w.violations().len()),
            Which::Own { world, .. } => world.violations().len(),
        };
        let s = SegregStats::from_stats(&self.get().stats(), violations as u64);
        let d = PyDict::new(py);
        for (name, value) in s.named() {
            d.set_item(name, value)?;
        }
        Ok(d)
    }

    /// The last error met off the caller's path (a deferred
    /// deregistration), if any.
    fn last_async_error(&self) -> Option<String> {
        self.get().last_async_error()
    }

    fn __repr__(&self) -> String {
        let which = if self.is_global() { "global" } else { "rank" };
        format!("Allocator({which}, backend={:?})", self.backend())
    }
}

/// The owner's abort of a borrowed non-blocking comm, as a Python
/// callable: run with the GIL (taken again by the thread whose call
/// reached its deadline, which released it); an exception means the comm
/// is not aborted.
fn abort_hook(hook: Py<PyAny>) -> AbortHook {
    Arc::new(move |raw: RawComm| {
        Python::attach(|py| {
            hook.call1(py, (raw.0,))
                .map(|_| ())
                .map_err(|e| format!("the abort hook raised: {e}"))
        })
    })
}
