//! The simulated calls: which they are, what the hook sees of one in
//! flight, and what the trace records of each.

use std::sync::Arc;

use crate::backend::{RawComm, Window};

/// A simulated NCCL call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SimOp {
    /// `ncclMemAlloc`.
    MemAlloc,
    /// `ncclMemFree`.
    MemFree,
    /// `ncclCommWindowRegister`.
    Register,
    /// `ncclCommWindowDeregister`.
    Deregister,
    /// `ncclAllReduce` (of `u64` words with `max`: the agreement).
    AllReduce,
    /// `ncclCommSplit`.
    Split,
    /// `ncclCommAbort`.
    Abort,
    /// `ncclCommGetAsyncError`.
    AsyncError,
    /// `ncclCommFinalize` + `ncclCommDestroy` of a comm the glue made.
    Destroy,
}

impl SimOp {
    /// The NCCL function's name.
    pub(super) fn call(self) -> &'static str {
        match self {
            SimOp::MemAlloc => "ncclMemAlloc",
            SimOp::MemFree => "ncclMemFree",
            SimOp::Register => "ncclCommWindowRegister",
            SimOp::Deregister => "ncclCommWindowDeregister",
            SimOp::AllReduce => "ncclAllReduce",
            SimOp::Split => "ncclCommSplit",
            SimOp::Abort => "ncclCommAbort",
            SimOp::AsyncError => "ncclCommGetAsyncError",
            SimOp::Destroy => "ncclCommDestroy",
        }
    }
}

/// A call in flight, as the hook sees it.
#[derive(Clone, Debug)]
pub struct SimCall {
    /// The simulated rank making it.
    pub rank: usize,
    /// Which call (only [`SimOp::Register`] and [`SimOp::Deregister`] reach
    /// the hook).
    pub op: SimOp,
    /// The raw comm handle.
    pub comm: RawComm,
    /// The simulator's id of that comm.
    pub comm_id: u64,
    /// The buffer (register) or zero.
    pub ptr: usize,
    /// The buffer's size (register) or zero.
    pub size: usize,
    /// The window (deregister) or `None`.
    pub window: Option<Window>,
}

/// A hook that runs inside every register and deregister call while it is
/// in flight (no simulator lock held). Tests park calls on barriers here.
pub type SimHook = Arc<dyn Fn(&SimCall) + Send + Sync>;

/// One simulated call, as the trace records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    /// The rank.
    pub rank: usize,
    /// The call.
    pub op: SimOp,
    /// The comm (null for memory calls).
    pub comm: RawComm,
    /// The pointer (register, alloc, free) or zero.
    pub ptr: usize,
    /// The window issued (register) or given (deregister).
    pub window: Option<Window>,
    /// Whether the call succeeded.
    pub ok: bool,
}
