//! The real backend: NCCL and the CUDA driver, loaded at run time through
//! cudarc (`dynamic-loading`), so the crate builds and runs on machines
//! without CUDA and reports their absence as a typed error.
//!
//! * `api`: the NCCL library and its entry points, resolved once, up
//!   front, each call one line through one return-code conversion;
//! * `context`: each device's primary context, and calls made with it
//!   current that leave the thread's current context as it was;
//! * `backend`: [`RealBackend`], the [`Backend`](crate::Backend) impl;
//! * `agreement`: the checked pass's all-reduce: its device buffer and
//!   stream, made at attach, and a wait on the stream that never blocks
//!   past its deadline;
//! * `multirank`: what only the two-rank program uses ([`UniqueId`], comm
//!   init by rank, the all-reduce, host–device copies).
//!
//! The CUDA driver goes through cudarc's safe `CudaContext`; the library
//! handle of NCCL comes from cudarc (`cudarc::nccl::sys::culib`, after
//! `is_culib_present`), and a missing library, a missing symbol or an old
//! NCCL is a [`BackendError`](crate::BackendError), never a panic.

mod agreement;
mod api;
mod backend;
mod context;
mod multirank;

pub use backend::RealBackend;
pub use multirank::UniqueId;
