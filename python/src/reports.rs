//! What passes and comms report, as read-only Python objects.

use pyo3::prelude::*;

use segment_registry_nccl::{CommInfo as RsCommInfo, CommState, PassSummary as RsPassSummary};

/// What one registration pass did.
#[pyclass(frozen, module = "segment_registry._native")]
pub(crate) struct PassSummary {
    /// The raw `ncclComm_t` of the pass.
    #[pyo3(get)]
    comm: usize,
    /// `(address, length)` of each segment registered, in call order.
    #[pyo3(get)]
    registered: Vec<(usize, usize)>,
    /// Registrations that returned a window.
    #[pyo3(get)]
    windows: usize,
    /// Registrations that returned no window (no symmetric support).
    #[pyo3(get)]
    null_windows: usize,
    /// Windows of segments freed during the pass, deregistered by it.
    #[pyo3(get)]
    handed_back: usize,
}

impl PassSummary {
    /// The summary of a pass on the raw comm `comm`.
    pub(crate) fn new(comm: usize, s: &RsPassSummary) -> Self {
        PassSummary {
            comm,
            registered: s.registered.iter().map(|g| (g.addr, g.len)).collect(),
            windows: s.windows,
            null_windows: s.null_windows,
            handed_back: s.handed_back,
        }
    }
}

#[pymethods]
impl PassSummary {
    fn __repr__(&self) -> String {
        format!(
            "PassSummary(comm={:#x}, registered={}, windows={}, null_windows={}, handed_back={})",
            self.comm,
            self.registered.len(),
            self.windows,
            self.null_windows,
            self.handed_back
        )
    }
}

/// One attached comm, as `Allocator.comms()` reports it.
#[pyclass(frozen, module = "segment_registry._native")]
pub(crate) struct CommInfo {
    /// Its raw `ncclComm_t`.
    #[pyo3(get)]
    comm: usize,
    /// `"active"`, `"failed"`, `"detaching"` or `"aborted"`.
    #[pyo3(get)]
    state: &'static str,
    /// Windows registered for live segments.
    #[pyo3(get)]
    windows: usize,
    /// Live segments its next pass would register.
    #[pyo3(get)]
    pending: usize,
    /// Whether its passes agree before they register.
    #[pyo3(get)]
    checked: bool,
    /// The deadline of each collective call on it, in seconds.
    #[pyo3(get)]
    deadline: f64,
    /// Why it failed, if it did.
    #[pyo3(get)]
    failure: Option<String>,
}

impl CommInfo {
    /// The Python view of the glue's figures.
    pub(crate) fn new(c: &RsCommInfo) -> Self {
        CommInfo {
            comm: c.raw.0,
            state: state_name(c.state),
            windows: c.windows,
            pending: c.pending,
            checked: c.checked,
            deadline: c.deadline.as_secs_f64(),
            failure: c.failure.clone(),
        }
    }
}

#[pymethods]
impl CommInfo {
    fn __repr__(&self) -> String {
        format!(
            "CommInfo(comm={:#x}, state={:?}, windows={}, pending={}, checked={})",
            self.comm,
            self.state,
            self.windows,
            self.pending,
            if self.checked { "True" } else { "False" }
        )
    }
}

/// A comm state's name.
fn state_name(s: CommState) -> &'static str {
    match s {
        CommState::Active => "active",
        CommState::Failed => "failed",
        CommState::Detaching => "detaching",
        CommState::Aborted => "aborted",
    }
}
