//! The NCCL calls the glue needs, behind one small trait.
//!
//! Two implementations ship: [`RealBackend`](crate::real::RealBackend)
//! (NCCL and the CUDA driver, loaded at run time through cudarc) and
//! [`SimBackend`](crate::sim::SimBackend) (pure Rust, several simulated ranks
//! in one process, for CPU machines and CI).

use std::fmt;

/// `NCCL_WIN_COLL_SYMMETRIC`: the flag that makes a window usable by
/// symmetric collective kernels.
pub const NCCL_WIN_COLL_SYMMETRIC: i32 = 1;

/// The buffer alignment NCCL 2.28 expects for window registration.
pub const WINDOW_ALIGN: usize = 4096;

/// The allocation granularity of `ncclMemAlloc` (cuMem VMM).
pub const MEM_GRANULARITY: usize = 2 << 20;

/// The oldest NCCL the glue accepts, as `ncclGetVersion` reports it
/// (2.28.0 → 22800).
pub const MIN_NCCL_VERSION: i32 = 22800;

/// A raw communicator handle: the value of an `ncclComm_t`.
///
/// The glue never uses it as an identity (NCCL reuses the address after a
/// comm is destroyed); attaching gives a registry-owned
/// [`CommId`](segment_registry::CommId) instead.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RawComm(pub usize);

impl RawComm {
    /// Whether the handle is null.
    pub fn is_null(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Debug for RawComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawComm({:#x})", self.0)
    }
}

/// A registered window: the raw `ncclWindow_t` value and a generation.
///
/// NCCL hands out a deregistered window's handle value again, so the raw
/// value alone does not name one registration; the generation does (the
/// backend that issued the window gives each one a fresh generation).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    /// The raw handle value (never zero: a null window is "no window").
    pub raw: usize,
    /// Issue number of this registration; unique within its backend.
    pub generation: u64,
}

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Window({:#x}#{})", self.raw, self.generation)
    }
}

/// Why a backend call failed. Every variant is a typed error: no backend
/// panics on bad input or a missing library.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// A shared library could not be loaded.
    #[error("the {lib} library was not found (is it on LD_LIBRARY_PATH?)")]
    LibraryMissing {
        /// Which library ("nccl" or "cuda").
        lib: &'static str,
    },
    /// A library lacks a symbol the glue needs.
    #[error("symbol {symbol} is missing from the {lib} library")]
    SymbolMissing {
        /// Which library.
        lib: &'static str,
        /// The symbol.
        symbol: &'static str,
    },
    /// The NCCL found is older than 2.28.
    #[error("NCCL {found} is too old: symmetric windows need {required} or newer")]
    NcclTooOld {
        /// `ncclGetVersion`'s value.
        found: i32,
        /// [`MIN_NCCL_VERSION`].
        required: i32,
    },
    /// An NCCL call returned an error code.
    #[error("{call} failed with NCCL error {code}: {message}")]
    Nccl {
        /// The NCCL function.
        call: &'static str,
        /// Its `ncclResult_t`.
        code: i32,
        /// `ncclGetErrorString` (and `ncclGetLastError` where available).
        message: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver call {call} failed: {message}")]
    Driver {
        /// What was being done.
        call: &'static str,
        /// The driver's error.
        message: String,
    },
    /// A null communicator was passed (NCCL 2.28 segfaults on it).
    #[error("{call} called with a null communicator")]
    NullComm {
        /// The call refused.
        call: &'static str,
    },
    /// A null pointer or a zero size was passed where memory was expected.
    #[error("{call}: invalid argument: {reason}")]
    InvalidArgument {
        /// The call refused.
        call: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The simulated backend refused a call that real NCCL would fail, hang
    /// or crash on (the violation is also recorded by the simulator).
    #[error("simulated {call} refused: {reason}")]
    SimRejected {
        /// The call refused.
        call: &'static str,
        /// Why.
        reason: String,
    },
    /// A fault injected into the simulated backend.
    #[error("injected fault: {call} #{nth} on rank {rank} fails")]
    Injected {
        /// The failing call.
        call: &'static str,
        /// Its number on that rank since the fault was armed (1-based).
        nth: u64,
        /// The simulated rank.
        rank: usize,
    },
}

/// The NCCL calls the allocator makes. Implementations are thread-safe; the
/// allocator itself guarantees at most one call in flight per comm (NCCL is
/// not thread-safe on one comm).
pub trait Backend: Send + Sync {
    /// A short name for logs ("nccl", "sim").
    fn name(&self) -> &'static str;

    /// `ncclMemAlloc` on `device`: returns the device pointer.
    fn mem_alloc(&self, size: usize, device: i32) -> Result<usize, BackendError>;

    /// `ncclMemFree`. Only called after every window that covers the
    /// memory was deregistered.
    fn mem_free(&self, ptr: usize) -> Result<(), BackendError>;

    /// `ncclCommWindowRegister` (collective). `Ok(None)`: NCCL returned a
    /// null window (no symmetric support), which counts as registered
    /// without a window.
    fn comm_window_register(
        &self,
        comm: RawComm,
        ptr: usize,
        size: usize,
        flags: i32,
    ) -> Result<Option<Window>, BackendError>;

    /// `ncclCommWindowDeregister` (local).
    fn comm_window_deregister(&self, comm: RawComm, window: Window) -> Result<(), BackendError>;
}

/// `Backend` for smart pointers to a backend: every call forwards.
macro_rules! forward_backend {
    ($($ptr:ident)::+) => {
        impl<B: Backend + ?Sized> Backend for $($ptr)::+<B> {
            fn name(&self) -> &'static str {
                (**self).name()
            }
            fn mem_alloc(&self, size: usize, device: i32) -> Result<usize, BackendError> {
                (**self).mem_alloc(size, device)
            }
            fn mem_free(&self, ptr: usize) -> Result<(), BackendError> {
                (**self).mem_free(ptr)
            }
            fn comm_window_register(
                &self,
                comm: RawComm,
                ptr: usize,
                size: usize,
                flags: i32,
            ) -> Result<Option<Window>, BackendError> {
                (**self).comm_window_register(comm, ptr, size, flags)
            }
            fn comm_window_deregister(
                &self,
                comm: RawComm,
                window: Window,
            ) -> Result<(), BackendError> {
                (**self).comm_window_deregister(comm, window)
            }
        }
    };
}

forward_backend!(Box);
forward_backend!(std::sync::Arc);
