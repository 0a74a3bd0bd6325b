//! NCCL symmetric-memory glue over the segment registry.
//!
//! An [`Allocator`] allocates with `ncclMemAlloc` and only *tracks* each
//! segment; registration with a communicator happens later, in a pass that
//! every rank runs at the same point ([`Allocator::register`],
//! [`Allocator::register_all`] in attach order), so that all ranks make the
//! same collective `ncclCommWindowRegister` calls in the same order. A free
//! deregisters the segment's windows before `ncclMemFree` and never waits
//! for a pass: a deregistration that meets a pass blocked in a collective on
//! the same comm is handed to that pass.
//!
//! * [`allocator`]: the [`Allocator`] (alloc, free, passes, detach, window
//!   lookup); its figures come from one table (`stats.rs`), which also
//!   makes the C ABI's `segreg_stats_t`.
//! * [`backend`]: the NCCL calls behind the [`Backend`] trait (memory,
//!   windows, and for checked comms split, all-reduce, abort and async
//!   errors), each collective one waited for under a [`Wait`].
//! * [`real`]: NCCL and the CUDA driver through cudarc, loaded at run time;
//!   absence is a typed error.
//! * [`sim`]: a pure-Rust multi-rank NCCL that checks NCCL's rules and
//!   injects faults, for CPU machines and CI.
//! * [`capi`]: the C ABI for PyTorch's `CUDAPluggableAllocator`
//!   (`include/segment_registry.h`).
//!
//! ```
//! # #[cfg(not(feature = "loom"))] {
//! use segment_registry_nccl::{sim::SimWorld, Allocator};
//!
//! // Two simulated ranks, one allocator (pool) per rank, two comms.
//! let world = SimWorld::new(2);
//! let ranks: Vec<_> = (0..2).map(|r| Allocator::new(world.rank(r).unwrap())).collect();
//! let tp = world.comm_create(&[0, 1]).unwrap();
//! let dp = world.comm_create(&[0, 1]).unwrap();
//! for (r, a) in ranks.iter().enumerate() {
//!     a.attach(tp[r]).unwrap();
//!     a.attach(dp[r]).unwrap();
//!     let p = a.alloc(2 << 20, 0).unwrap();
//!     for (_, pass) in a.register_all() {
//!         assert_eq!(pass.unwrap().windows, 1);
//!     }
//!     a.free(p).unwrap();
//! }
//! assert!(world.verify().is_empty());
//! # }
//! ```

pub mod allocator;
pub mod backend;
pub mod capi;
mod error;
mod gate;
pub mod real;
pub mod sim;
mod stats;
mod util;
mod watchdog;

pub use allocator::{
    deadline_from_env, AbortHook, Allocator, AllocatorStats, AttachOptions, CommInfo, CommOwner,
    CommState, DetachReport, FreeReport, PassSummary, TestFaults, WindowError, DEADLINE_ENV,
    DEFAULT_DEADLINE,
};
pub use backend::{
    AtDeadline, Backend, BackendError, Backoff, CommProgress, DeadlineAction, RawComm, Wait,
    Window, MAX_AGREEMENT_WORDS, MEM_GRANULARITY, MIN_NCCL_VERSION, NCCL_IN_PROGRESS,
    NCCL_WIN_COLL_SYMMETRIC, WINDOW_ALIGN,
};
pub use error::{AllocError, AttachError, DetachError, FreeError, RegisterError};
pub use segment_registry::{
    CommId, Digest, DigestRange, Divergence, Segment, WindowLookupError, WindowRef,
};
