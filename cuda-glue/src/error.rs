//! Typed errors of the allocator. None of its operations panics on bad
//! input.

use segment_registry::{CommId, Digest, Divergence, Segment, TrackError};

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

/// Why [`Allocator::attach`](crate::Allocator::attach) (or
/// [`attach_with`](crate::Allocator::attach_with)) refused a comm. Nothing
/// is attached when it does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
    /// A checked attach could not set up the private agreement comm: the
    /// split from `raw`, its buffer, or the warm-up all-reduce failed (a
    /// peer that did not attach at the same point ends here at the
    /// deadline). Whatever was made was aborted; nothing is attached.
    #[error("checked attach of {raw:?}: setting up the agreement comm failed: {source}")]
    Agreement {
        /// The handle.
        raw: RawComm,
        /// The backend's error.
        #[source]
        source: BackendError,
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
    /// A checked pass found that the ranks would register different sets
    /// (or one abstained): nothing was registered, on any rank; the
    /// segments stay pending and the comm stays healthy. The message says
    /// what differs and what to do.
    #[error("{}", describe_divergence(.0))]
    Diverged(Box<Divergence>),
    /// A checked pass's agreement failed (its all-reduce timed out, or a
    /// peer's error reached it): nothing was registered, and the private
    /// agreement comm was aborted, so the comm is failed now (its windows
    /// stay valid; detach it).
    #[error(
        "{comm}: the agreement before registering failed, so nothing was registered: {source}; \
         its agreement comm was aborted and the comm is failed: detach it"
    )]
    Agreement {
        /// The comm.
        comm: CommId,
        /// The backend's error (a [`BackendError::Timeout`] names the call
        /// and the time waited).
        #[source]
        source: BackendError,
    },
    /// A registration did not complete by the comm's deadline, so the comm
    /// was aborted (by the glue, or through its owner's hook): it is
    /// [`CommState::Aborted`](crate::CommState::Aborted) now, its windows
    /// are gone (NCCL freed them), the process goes on.
    #[error(
        "{call} on {comm} did not complete in {waited:.1?}: the comm was aborted; \
         its windows are gone; detach it (no NCCL call) and make a new comm"
    )]
    Timeout {
        /// The comm.
        comm: CommId,
        /// The NCCL call that reached the deadline.
        call: &'static str,
        /// How long the calling thread waited.
        waited: std::time::Duration,
    },
    /// The comm was aborted earlier (a call reached its deadline): no call
    /// is made on it again; detach it.
    #[error("{comm} was aborted ({reason}); detach it")]
    Aborted {
        /// The comm.
        comm: CommId,
        /// Why.
        reason: String,
    },
    /// [`Allocator::abstain`](crate::Allocator::abstain) on a comm that was
    /// not attached checked.
    #[error("{0} is not a checked comm (attach it with AttachOptions::checked)")]
    NotChecked(CommId),
}

/// Bytes as MiB, with one decimal when not whole.
fn mib(bytes: u64) -> String {
    let m = bytes as f64 / (1u64 << 20) as f64;
    if m.fract() == 0.0 {
        format!("{m:.0} MiB")
    } else {
        format!("{m:.1} MiB")
    }
}

/// "`n` pending segments (`b` MiB)".
fn pending(d: &Digest) -> String {
    let s = if d.segments == 1 { "" } else { "s" };
    format!("{} pending segment{s} ({})", d.segments, mib(d.bytes))
}

/// The words of a [`RegisterError::Diverged`]: what differs between this
/// rank and the group, and what to do about it.
pub(crate) fn describe_divergence(d: &Divergence) -> String {
    let (local, lo, hi) = (&d.local, &d.group.min, &d.group.max);
    let comm = d.comm;
    let head = format!("{comm}: the ranks disagree, so nothing was registered on any rank");
    if local.abstain != 0 {
        return format!(
            "{comm}: this rank abstained from checked pass {} (it cannot register now), so \
             nothing was registered on any rank; it has {}",
            local.passes,
            pending(local)
        );
    }
    if lo.passes != hi.passes {
        return format!(
            "{head}: this rank is at checked pass {}, the group at {} to {} (a rank skipped a \
             pass or ran an extra one); every rank now counts from {}: run the passes at the \
             same program points on every rank, then register again",
            local.passes, lo.passes, hi.passes, hi.passes
        );
    }
    if lo.segments != hi.segments {
        return format!(
            "{head}: this rank has {}; the group has {} to {}; free or allocate so every rank \
             matches, then register again",
            pending(local),
            lo.segments,
            hi.segments
        );
    }
    if lo.bytes != hi.bytes {
        return format!(
            "{head}: this rank has {}; the group has {} segments of {} to {} in all; free or \
             allocate so every rank matches, then register again",
            pending(local),
            lo.segments,
            mib(lo.bytes),
            mib(hi.bytes)
        );
    }
    if lo.lengths_hash != hi.lengths_hash {
        return format!(
            "{head}: this rank has {}, as many and as large as the group's, but of other \
             lengths or in another order; allocate in the same order on every rank, then \
             register again",
            pending(local)
        );
    }
    format!(
        "{head}: a rank abstained (it cannot register now); this rank has {}; register again \
         on every rank once that rank can",
        pending(local)
    )
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
