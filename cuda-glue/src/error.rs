//! Typed errors of the allocator. None of its operations panics on bad
//! input.

use segment_registry::{CommId, Segment, TrackError};

use crate::backend::{BackendError, RawComm};

/// Why [`Allocator::alloc`](crate::Allocator::alloc) failed. Nothing is
/// tracked and no memory is kept when it does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// A zero-byte request.
    #[error("zero-byte allocation")]
    ZeroSize,
    /// `ncclMemAlloc` failed.
    #[error("ncclMemAlloc failed: {0}")]
    Backend(#[source] BackendError),
    /// The new memory overlaps a tracked segment (a backend handed out live
    /// memory twice); it was given back.
    #[error("the registry refused the new segment: {0}")]
    Track(#[source] TrackError),
}

/// Why [`Allocator::free`](crate::Allocator::free) refused a pointer. The
/// allocator is unchanged when it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FreeError {
    /// A null pointer.
    #[error("free of a null pointer")]
    Null,
    /// Not the start of a live allocation of this allocator (unknown
    /// pointer, interior pointer, or double free).
    #[error("free of {ptr:#x}, which is not a live allocation (unknown pointer or double free)")]
    Unknown {
        /// The pointer given.
        ptr: usize,
    },
}

/// Why [`Allocator::attach`](crate::Allocator::attach) refused a comm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// A null `ncclComm_t`.
    #[error("attach of a null communicator")]
    NullComm,
    /// The handle is attached already (detach it first; a reused address
    /// of a destroyed comm is attached anew only after that detach).
    #[error("{raw:?} is already attached as {comm}")]
    AlreadyAttached {
        /// The handle.
        raw: RawComm,
        /// Its id.
        comm: CommId,
    },
}

/// Why a registration pass ([`Allocator::register`](crate::Allocator::register))
/// failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// The comm is not attached (never, or detached, or being detached).
    #[error("{0} is not attached")]
    NotAttached(CommId),
    /// A pass for this comm is already running on another thread.
    #[error("a registration pass for {0} is already running")]
    Busy(CommId),
    /// An earlier registration failed on this comm; a failed collective
    /// cannot be retried on one rank alone, so only detach is allowed.
    #[error("{comm} is failed ({reason}); detach it")]
    Failed {
        /// The comm.
        comm: CommId,
        /// What failed.
        reason: String,
    },
    /// `ncclCommWindowRegister` failed on `segment`: the comm is now
    /// failed. Segments before it stay registered (detach deregisters
    /// them); the failed one holds no window.
    #[error("ncclCommWindowRegister failed on {comm} for segment {segment:?}: {source}")]
    Register {
        /// The comm.
        comm: CommId,
        /// The segment it failed on.
        segment: Segment,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
}

/// Why [`Allocator::detach`](crate::Allocator::detach) did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetachError {
    /// The comm is not attached.
    #[error("{0} is not attached")]
    NotAttached(CommId),
    /// Some windows could not be deregistered. The comm stays attached (no
    /// new passes); call detach again to retry them. Do not destroy the
    /// comm before it succeeds.
    #[error("{remaining} window(s) of {comm} could not be deregistered: {last}")]
    Incomplete {
        /// The comm.
        comm: CommId,
        /// Windows still registered.
        remaining: usize,
        /// The last deregistration error.
        last: String,
    },
}
