//! The exception hierarchy: every error of the glue as a subclass of
//! `SegmentRegistryError`, whose message says what happened and what to
//! do.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

use segment_registry_nccl::capi::InitError;
use segment_registry_nccl::{
    AllocError as RsAllocError, AttachError as RsAttachError, DetachError as RsDetachError,
    FreeError, RegisterError, WindowError, WindowLookupError,
};

create_exception!(
    _native,
    SegmentRegistryError,
    PyException,
    "Base class of every error of the segment registry."
);
create_exception!(
    _native,
    NotInitializedError,
    SegmentRegistryError,
    "The process-wide allocator is not initialised: call segment_registry.init first."
);
create_exception!(
    _native,
    BackendUnavailableError,
    SegmentRegistryError,
    "CUDA or NCCL is missing or too old, or another backend was chosen already."
);
create_exception!(
    _native,
    DuplicateStateError,
    SegmentRegistryError,
    "Another copy of the allocator is initialised in this process: load only one."
);
create_exception!(
    _native,
    AllocError,
    SegmentRegistryError,
    "An allocation failed (zero size, out of memory, NCCL refused)."
);
create_exception!(
    _native,
    BadPointerError,
    SegmentRegistryError,
    "A pointer the allocator does not know (null, unknown, freed, or a range past its allocation)."
);
create_exception!(
    _native,
    AttachError,
    SegmentRegistryError,
    "A comm could not be attached (null, already attached, agreement comm not made)."
);
create_exception!(
    _native,
    NotAttachedError,
    SegmentRegistryError,
    "The comm is not attached (never, or detached)."
);
create_exception!(
    _native,
    BusyError,
    SegmentRegistryError,
    "A registration pass already runs on this comm, on another thread."
);
create_exception!(
    _native,
    CommFailedError,
    SegmentRegistryError,
    "A registration failed on this comm, now or before: only detach is allowed."
);
create_exception!(
    _native,
    DivergedError,
    SegmentRegistryError,
    "A checked pass found that the ranks disagree (or one abstained): nothing was registered \
     on any rank and the comm is healthy; make every rank hold the same segments, then \
     register again."
);
create_exception!(
    _native,
    AgreementError,
    SegmentRegistryError,
    "A checked pass's agreement failed or reached its deadline: nothing was registered and \
     the comm is failed now; detach it."
);
create_exception!(
    _native,
    TimeoutError,
    SegmentRegistryError,
    "A call reached the comm's deadline and the comm was aborted: its windows are gone; \
     detach it and recreate the group on every rank."
);
create_exception!(
    _native,
    AbortedError,
    SegmentRegistryError,
    "The comm was aborted earlier: detach it and recreate the group on every rank."
);
create_exception!(
    _native,
    NotCheckedError,
    SegmentRegistryError,
    "The operation needs a comm attached with checked=True."
);
create_exception!(
    _native,
    NotRegisteredError,
    SegmentRegistryError,
    "The allocation is not registered with this comm yet: register on every rank first."
);
create_exception!(
    _native,
    NoWindowError,
    SegmentRegistryError,
    "Registered without a window: the comm has no symmetric-memory support."
);
create_exception!(
    _native,
    DetachError,
    SegmentRegistryError,
    "A detach could not deregister every window: call detach again before destroying the comm."
);

/// Adds every exception class to the module.
pub(crate) fn add_all(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add(
        "SegmentRegistryError",
        py.get_type::<SegmentRegistryError>(),
    )?;
    m.add("NotInitializedError", py.get_type::<NotInitializedError>())?;
    m.add(
        "BackendUnavailableError",
        py.get_type::<BackendUnavailableError>(),
    )?;
    m.add("DuplicateStateError", py.get_type::<DuplicateStateError>())?;
    m.add("AllocError", py.get_type::<AllocError>())?;
    m.add("BadPointerError", py.get_type::<BadPointerError>())?;
    m.add("AttachError", py.get_type::<AttachError>())?;
    m.add("NotAttachedError", py.get_type::<NotAttachedError>())?;
    m.add("BusyError", py.get_type::<BusyError>())?;
    m.add("CommFailedError", py.get_type::<CommFailedError>())?;
    m.add("DivergedError", py.get_type::<DivergedError>())?;
    m.add("AgreementError", py.get_type::<AgreementError>())?;
    m.add("TimeoutError", py.get_type::<TimeoutError>())?;
    m.add("AbortedError", py.get_type::<AbortedError>())?;
    m.add("NotCheckedError", py.get_type::<NotCheckedError>())?;
    m.add("NotRegisteredError", py.get_type::<NotRegisteredError>())?;
    m.add("NoWindowError", py.get_type::<NoWindowError>())?;
    m.add("DetachError", py.get_type::<DetachError>())?;
    Ok(())
}

/// A pass's error.
pub(crate) fn register_error(e: RegisterError) -> PyErr {
    let msg = e.to_string();
    match e {
        RegisterError::NotAttached(_) => NotAttachedError::new_err(msg),
        RegisterError::Busy(_) => BusyError::new_err(format!(
            "{msg}: a comm's passes run on the thread that issues its group's collectives"
        )),
        RegisterError::Failed { .. } | RegisterError::Register { .. } => {
            CommFailedError::new_err(msg)
        }
        RegisterError::Diverged(_) => DivergedError::new_err(msg),
        RegisterError::Agreement { .. } => AgreementError::new_err(msg),
        RegisterError::Timeout { .. } => TimeoutError::new_err(msg),
        RegisterError::Aborted { .. } => AbortedError::new_err(msg),
        RegisterError::NotChecked(_) => NotCheckedError::new_err(msg),
    }
}

/// An allocation's error.
pub(crate) fn alloc_error(e: RsAllocError) -> PyErr {
    AllocError::new_err(e.to_string())
}

/// A free's error.
pub(crate) fn free_error(e: FreeError) -> PyErr {
    BadPointerError::new_err(e.to_string())
}

/// An attach's error.
pub(crate) fn attach_error(e: RsAttachError) -> PyErr {
    AttachError::new_err(e.to_string())
}

/// A detach's error.
pub(crate) fn detach_error(e: RsDetachError) -> PyErr {
    let msg = e.to_string();
    match e {
        RsDetachError::NotAttached(_) => NotAttachedError::new_err(msg),
        RsDetachError::Incomplete { .. } => DetachError::new_err(msg),
    }
}

/// A window lookup's error.
pub(crate) fn window_error(e: WindowError) -> PyErr {
    use WindowLookupError as L;
    let msg = e.to_string();
    match e {
        WindowError::UnknownComm(_) | WindowError::Lookup(L::NotAttached(_)) => {
            NotAttachedError::new_err(msg)
        }
        WindowError::Lookup(L::NotTracked { .. } | L::CrossesEnd { .. }) => {
            BadPointerError::new_err(msg)
        }
        WindowError::Lookup(L::NotRegistered { .. }) => NotRegisteredError::new_err(format!(
            "{msg}: leave a symmetric-memory region (or call register) on every rank first"
        )),
        WindowError::Lookup(L::NoWindow { .. }) => NoWindowError::new_err(msg),
    }
}

/// The process-wide allocator's initialization error.
pub(crate) fn init_error(e: InitError) -> PyErr {
    let msg = e.to_string();
    match e {
        InitError::OtherCopy(_) => DuplicateStateError::new_err(msg),
        InitError::OtherBackend { .. } | InitError::Backend(_) => {
            BackendUnavailableError::new_err(msg)
        }
    }
}
