//! Typed errors. No operation panics on bad input, and none changes the
//! registry when it returns an error (except a pass, which keeps what it
//! registered before the failure, as documented on it).

use crate::{CommId, Digest, DigestRange, Segment};

/// Why [`Registry::track`](crate::Registry::track) refused a segment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackError {
    /// The segment has no bytes.
    #[error("segment at {addr:#x} has zero length")]
    ZeroLength {
        /// The start address given.
        addr: usize,
    },
    /// `addr + len` does not fit in the address space.
    #[error("segment at {addr:#x} of {len} bytes overflows the address space")]
    Overflow {
        /// The start address given.
        addr: usize,
        /// The length given.
        len: usize,
    },
    /// The range overlaps a tracked segment, or lost an overlap race to a
    /// concurrent track (a caller bug: a double free or a stale pointer).
    #[error("segment [{addr:#x}, +{len}) overlaps [{other_addr:#x}, +{other_len})")]
    Overlap {
        /// The start address given.
        addr: usize,
        /// The length given.
        len: usize,
        /// Start of the segment it overlaps.
        other_addr: usize,
        /// Length of the segment it overlaps.
        other_len: usize,
    },
}

/// Why [`Registry::untrack`](crate::Registry::untrack) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UntrackError {
    /// No tracked segment starts at this address.
    #[error("no tracked segment starts at {addr:#x}")]
    Unknown {
        /// The address given.
        addr: usize,
    },
}

/// Why an operation on a comm failed before it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommError {
    /// The comm was never attached, or has been forgotten.
    #[error("{0} is not attached")]
    NotAttached(CommId),
    /// Another registration pass for this comm is running (passes on one comm
    /// are serialized; the registry never waits for one).
    #[error("a registration pass for {0} is already running")]
    Busy(CommId),
}

/// Why a registration pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum PassError<E> {
    /// The pass could not start.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// The callback failed on `segment`. Every segment before it stays
    /// registered and recorded; a retry starts again at `segment`.
    #[error("registration of segment {segment:?} failed")]
    Callback {
        /// The segment the callback failed on (still pending for the comm).
        segment: Segment,
        /// The callback's error.
        #[source]
        error: E,
    },
    /// The comm was forgotten while the pass ran; the pass stopped early.
    #[error("{0} was forgotten while its pass ran")]
    Forgotten(CommId),
    /// A checked pass found that the ranks disagree (or one abstained):
    /// nothing was registered, the segments stay pending, and the comm is
    /// healthy. Free or allocate so that every rank has the same pending
    /// segments, then run the pass again on every rank.
    #[error("{0}")]
    Diverged(Box<Divergence>),
    /// A checked pass's agreement failed (for instance it timed out):
    /// nothing was registered and the segments stay pending.
    #[error("{comm}: the agreement before registering failed")]
    Agreement {
        /// The comm.
        comm: CommId,
        /// The agreement's error.
        #[source]
        error: E,
    },
}

/// Why [`Registry::window_of`](crate::Registry::window_of) found no window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WindowLookupError {
    /// The comm was never attached, or has been forgotten.
    #[error("{0} is not attached")]
    NotAttached(CommId),
    /// No tracked segment contains the pointer.
    #[error("no tracked segment contains {ptr:#x}")]
    NotTracked {
        /// The pointer given.
        ptr: usize,
    },
    /// The range starts in a segment but runs past its end.
    #[error("[{ptr:#x}, +{size}) runs past the end of {segment:?}")]
    CrossesEnd {
        /// The pointer given.
        ptr: usize,
        /// The size given.
        size: usize,
        /// The segment that contains `ptr`.
        segment: Segment,
    },
    /// The segment is tracked but has not been registered with this comm yet
    /// (a registration pass is missing).
    #[error("{segment:?} is not registered with {comm} yet")]
    NotRegistered {
        /// The comm.
        comm: CommId,
        /// The segment.
        segment: Segment,
    },
    /// Registered without a window: the comm has no symmetric support.
    #[error("{segment:?} is registered with {comm} without a window (no symmetric support)")]
    NoWindow {
        /// The comm.
        comm: CommId,
        /// The segment.
        segment: Segment,
    },
}

/// What a [`PassError::Diverged`] pass found: this rank's digest and the
/// group's range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "{comm}: the ranks disagree on what to register, so nothing was: this rank has {} \
     pending segments ({} bytes) at checked pass {}{}; the group has {group}; free or \
     allocate so that every rank has the same segments, then register again on every rank",
    local.segments, local.bytes, local.passes,
    if local.abstain != 0 { " and abstained" } else { "" }
)]
pub struct Divergence {
    /// The comm.
    pub comm: CommId,
    /// This rank's digest.
    pub local: Digest,
    /// The group's range.
    pub group: DigestRange,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_comm_and_the_segment() {
        assert_eq!(
            CommError::Busy(CommId(3)).to_string(),
            "a registration pass for comm#3 is already running"
        );
        assert_eq!(
            CommError::NotAttached(CommId(7)).to_string(),
            "comm#7 is not attached"
        );
        assert_eq!(
            TrackError::Overlap {
                addr: 0x1000,
                len: 64,
                other_addr: 0x1020,
                other_len: 8
            }
            .to_string(),
            "segment [0x1000, +64) overlaps [0x1020, +8)"
        );
    }
}
