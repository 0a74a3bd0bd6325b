//! A lock-free, model-checked registry of memory segments with
//! per-communicator watermark cursors.
//!
//! An allocator [`track`](Registry::track)s every segment it gets (for NCCL,
//! from `ncclMemAlloc`). At a point the application chooses, each
//! communicator ("comm") runs a *registration pass*
//! ([`register_pending`](Registry::register_pending)) that visits, in
//! `seq` order, the segments it has not seen yet, so that every rank issues
//! the same collective registrations in the same order. On free,
//! [`untrack`](Registry::untrack) hands back the windows to deregister
//! first.
//!
//! * `track`, `untrack`, [`find`](Registry::find) and iteration are
//!   lock-free and never wait for a pass; they cost O(log n).
//! * A pass's set is fixed when it begins; passes for different comms run in
//!   parallel, passes for one comm are serialized ([`CommError::Busy`]).
//! * Every window a pass recorded is handed back exactly once.
//! * Memory stays proportional to the live segments under any churn.
//!
//! The protocol, every atomic ordering, and what the models check are in
//! `DESIGN.md` at the repository root.
//!
//! ```
//! # #[cfg(not(feature = "loom"))] {
//! use segment_registry::Registry;
//!
//! let reg: Registry<&str, u64> = Registry::new();
//! let comm = reg.attach("tp-group");
//! reg.track(0x20_0000, 0x20_0000).unwrap();
//! reg.track(0x60_0000, 0x20_0000).unwrap();
//! let report = reg
//!     .register_pending(comm, |_, seg| Ok::<_, ()>(Some(seg.addr as u64)))
//!     .unwrap();
//! assert_eq!(report.registered.len(), 2);
//! assert_eq!(reg.find(0x21_0000).map(|s| s.addr), Some(0x20_0000));
//! assert_eq!(reg.pending(comm), Ok(0));
//! # }
//! ```

/// The README's examples, compiled and run as doc tests.
#[cfg(all(doctest, not(feature = "loom")))]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

mod agreement;
mod comm_state;
mod counters;
mod error;
mod faults;
mod index;
mod node;
mod pagemap;
mod records;
mod registry;
mod results;
mod state;
mod sync;

pub use agreement::{Digest, DigestRange};
pub use error::{CommError, Divergence, PassError, TrackError, UntrackError, WindowLookupError};
#[cfg(feature = "test-support")]
pub use faults::Faults;
pub use index::{AddressIndex, NodeRef, SkipIndex};
pub use pagemap::DEFAULT_PAGE_GRANULE;
pub use registry::{Registry, SWEEP_SLACK};
pub use results::{
    CommStats, Forgotten, HandBack, Hold, NodeCounts, PassFailure, PassReport, PassResult, Stats,
    Untracked, WindowRef,
};

/// A tracked segment: `[addr, addr + len)`, and its place `seq` in the order
/// in which tracks took effect (1, 2, 3, … in a fresh registry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Segment {
    /// First byte.
    pub addr: usize,
    /// Length in bytes (never zero).
    pub len: usize,
    /// Track order. A freed and re-tracked address gets a new seq.
    pub seq: u64,
}

impl Segment {
    /// One past the last byte.
    pub fn end(&self) -> usize {
        self.addr + self.len
    }

    /// Whether `addr` lies inside the segment.
    pub fn contains(&self, addr: usize) -> bool {
        self.addr <= addr && addr < self.end()
    }
}

/// A registry-owned comm id: never reused, increasing in attach order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommId(pub u64);

impl std::fmt::Display for CommId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "comm#{}", self.0)
    }
}
