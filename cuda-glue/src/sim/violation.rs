//! The breaches of NCCL's rules that the simulator records.

use super::site::BufferId;
use crate::backend::Window;

/// How two ranks' registrations at the same position differ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// Different sizes.
    Size {
        /// The first rank's size.
        first: usize,
        /// The other rank's size.
        other: usize,
    },
    /// Same size, different buffers: the ranks' registration order differs.
    Order {
        /// The first rank's buffer.
        first: Option<BufferId>,
        /// The other rank's buffer.
        other: Option<BufferId>,
    },
}

/// A breach of NCCL's rules that the simulator saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Two members of a comm made different registrations at the same
    /// position of their collective sequence.
    CollectiveMismatch {
        /// Simulator comm id.
        comm: u64,
        /// Position in the sequence (0-based).
        index: usize,
        /// The rank that made the call first, and the one that differs.
        ranks: (usize, usize),
        /// How they differ.
        what: Mismatch,
    },
    /// Members of a comm made different numbers of registrations (checked by
    /// [`SimWorld::verify`](super::SimWorld::verify) and when the last member destroys the comm).
    CollectiveCountMismatch {
        /// Simulator comm id.
        comm: u64,
        /// `(rank, registrations)` per member.
        counts: Vec<(usize, usize)>,
    },
    /// Two calls were in flight on one comm and rank at the same time.
    ConcurrentCalls {
        /// Simulator comm id.
        comm: u64,
        /// The rank.
        rank: usize,
        /// The call already in flight.
        first: &'static str,
        /// The call that came in meanwhile.
        second: &'static str,
    },
    /// Memory freed while a window still covered it (NCCL returns success
    /// and silently keeps the window and the mapping).
    FreedWhileRegistered {
        /// The rank.
        rank: usize,
        /// The allocation freed.
        ptr: usize,
        /// A window still covering it.
        window: Window,
    },
    /// Memory freed while a registration of it was in flight.
    FreedDuringRegistration {
        /// The rank.
        rank: usize,
        /// The allocation freed.
        ptr: usize,
    },
    /// A range registered again on a comm that already has a window over it
    /// (NCCL ≥ 2.28.7 returns a second window).
    DuplicateRegistration {
        /// Simulator comm id.
        comm: u64,
        /// The rank.
        rank: usize,
        /// The buffer.
        ptr: usize,
        /// The window already there.
        existing: Window,
    },
    /// A window deregistered that is not registered (twice, or a stale
    /// handle whose value was reissued).
    DoubleDeregister {
        /// Simulator comm id.
        comm: u64,
        /// The rank.
        rank: usize,
        /// The window given.
        window: Window,
    },
    /// A window deregistered on a comm other than its own.
    WrongComm {
        /// The rank.
        rank: usize,
        /// The window.
        window: Window,
        /// Comm it belongs to.
        registered_on: u64,
        /// Comm it was deregistered on.
        called_on: u64,
    },
    /// A buffer not aligned to 4096 bytes.
    Misaligned {
        /// Simulator comm id.
        comm: u64,
        /// The rank.
        rank: usize,
        /// The buffer.
        ptr: usize,
    },
    /// A call with a null comm (NCCL 2.28 segfaults).
    NullComm {
        /// The rank.
        rank: usize,
        /// The call.
        call: &'static str,
    },
    /// A call on a comm handle that is not live (never made, or destroyed).
    UnknownComm {
        /// The rank.
        rank: usize,
        /// The call.
        call: &'static str,
        /// The handle.
        raw: usize,
    },
    /// A comm handle of another rank used on this one.
    ForeignComm {
        /// The rank that made the call.
        rank: usize,
        /// The handle.
        raw: usize,
        /// The rank it belongs to.
        owner: usize,
    },
    /// A registration of memory that this rank did not allocate (NCCL:
    /// `ncclUnhandledCudaError`).
    UnknownBuffer {
        /// Simulator comm id.
        comm: u64,
        /// The rank.
        rank: usize,
        /// The buffer.
        ptr: usize,
        /// Its size.
        size: usize,
    },
    /// `ncclMemFree` of memory that is not allocated (double free or stray
    /// pointer).
    BadFree {
        /// The rank.
        rank: usize,
        /// The pointer.
        ptr: usize,
    },
    /// A call on a comm handle after `ncclCommAbort` freed it (NCCL: a use
    /// after free; the windows it had are gone too).
    CallAfterAbort {
        /// Simulator comm id.
        comm: u64,
        /// The rank.
        rank: usize,
        /// The call.
        call: &'static str,
    },
    /// `ncclCommAbort` of a *blocking* comm while a call was in flight on
    /// it: NCCL frees the comm under the thread inside that call. Only the
    /// polling thread of a non-blocking comm may abort it mid-call.
    AbortDuringCall {
        /// Simulator comm id.
        comm: u64,
        /// The rank.
        rank: usize,
        /// The call in flight.
        call: &'static str,
    },
    /// Members of a comm met in one rendezvous with different calls or
    /// different lengths (NCCL: a hang or garbage).
    RendezvousMismatch {
        /// Simulator comm id.
        comm: u64,
        /// The rendezvous number (0-based).
        index: u64,
        /// What differed.
        what: String,
    },
    /// A comm destroyed while windows were still registered on it.
    DestroyWithWindows {
        /// Simulator comm id.
        comm: u64,
        /// The rank.
        rank: usize,
        /// How many.
        windows: usize,
    },
}

impl Violation {
    /// A short name of the rule broken, for grouping and summaries.
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::CollectiveMismatch {
                what: Mismatch::Size { .. },
                ..
            } => "collective-size",
            Violation::CollectiveMismatch {
                what: Mismatch::Order { .. },
                ..
            } => "collective-order",
            Violation::CollectiveCountMismatch { .. } => "collective-count",
            Violation::ConcurrentCalls { .. } => "concurrent-calls",
            Violation::FreedWhileRegistered { .. } => "freed-while-registered",
            Violation::FreedDuringRegistration { .. } => "freed-during-registration",
            Violation::DuplicateRegistration { .. } => "duplicate-registration",
            Violation::DoubleDeregister { .. } => "double-deregister",
            Violation::WrongComm { .. } => "wrong-comm",
            Violation::Misaligned { .. } => "misaligned",
            Violation::NullComm { .. } => "null-comm",
            Violation::UnknownComm { .. } => "unknown-comm",
            Violation::ForeignComm { .. } => "foreign-comm",
            Violation::UnknownBuffer { .. } => "unknown-buffer",
            Violation::BadFree { .. } => "bad-free",
            Violation::DestroyWithWindows { .. } => "destroy-with-windows",
            Violation::CallAfterAbort { .. } => "call-after-abort",
            Violation::AbortDuringCall { .. } => "abort-during-call",
            Violation::RendezvousMismatch { .. } => "rendezvous-mismatch",
        }
    }
}
