//! Window lookup: which window of a comm covers a tensor, at which offset
//! (HCCL's `HcclCommSymWinGet`), from the registry alone.

use segment_registry::{CommId, Segment, WindowLookupError};

use super::raw_index::RawLookup;
use super::Allocator;
use crate::backend::{Backend, RawComm, Window};

/// A window found by [`Allocator::window_of`]: what NCCL's device API
/// needs to address the tensor, `ncclGetLocalPointer(window, offset)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowHit {
    /// The window registered with the comm for the segment (its `raw` is
    /// the `ncclWindow_t`).
    pub window: Window,
    /// Offset of the queried pointer from the start of the window (the
    /// segment's start: windows cover whole segments).
    pub offset: usize,
    /// The segment that contains the queried range.
    pub segment: Segment,
}

/// Why [`Allocator::window_of`] (or [`Allocator::window_of_raw`]) returned
/// no window. Every answer of the registry has its own variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// The comm is not attached (never attached, detached, or being
    /// detached).
    #[error("{0} is not attached")]
    NotAttached(CommId),
    /// No attached comm has this raw handle ([`Allocator::window_of_raw`]).
    #[error("{0:?} is not attached")]
    UnknownComm(RawComm),
    /// No live allocation of this allocator contains the pointer (an
    /// unknown pointer, or one whose allocation was freed).
    #[error("no live allocation contains {ptr:#x} (unknown pointer, or freed)")]
    NotTracked {
        /// The pointer given.
        ptr: usize,
    },
    /// The range starts inside an allocation but runs past its end.
    #[error(
        "[{ptr:#x}, +{size}) runs past the end of the allocation at {:#x} ({} bytes)",
        segment.addr,
        segment.len
    )]
    CrossesEnd {
        /// The pointer given.
        ptr: usize,
        /// The size given.
        size: usize,
        /// The allocation that contains `ptr`.
        segment: Segment,
    },
    /// The allocation is not registered with this comm yet: no pass has run
    /// on the comm since it was allocated (or one is registering it now).
    #[error(
        "the allocation at {:#x} is not registered with {comm} yet (run a registration pass)",
        segment.addr
    )]
    NotRegistered {
        /// The comm.
        comm: CommId,
        /// The allocation.
        segment: Segment,
    },
    /// Registered, but NCCL returned a null window: the comm has no
    /// symmetric-memory support.
    #[error(
        "the allocation at {:#x} is registered with {comm} without a window \
         (no symmetric support)",
        segment.addr
    )]
    NoWindow {
        /// The comm.
        comm: CommId,
        /// The allocation.
        segment: Segment,
    },
}

impl From<WindowLookupError> for WindowError {
    fn from(e: WindowLookupError) -> Self {
        match e {
            WindowLookupError::NotAttached(c) => WindowError::NotAttached(c),
            WindowLookupError::NotTracked { ptr } => WindowError::NotTracked { ptr },
            WindowLookupError::CrossesEnd { ptr, size, segment } => {
                WindowError::CrossesEnd { ptr, size, segment }
            }
            WindowLookupError::NotRegistered { comm, segment } => {
                WindowError::NotRegistered { comm, segment }
            }
            WindowLookupError::NoWindow { comm, segment } => {
                WindowError::NoWindow { comm, segment }
            }
        }
    }
}

impl<B: Backend> Allocator<B> {
    /// The window registered with `comm` for the allocation that contains
    /// the whole byte range `[ptr, ptr + size)`, and the offset of `ptr` in
    /// it: the arguments of NCCL's device-side
    /// `ncclGetLocalPointer(window, offset)` (HCCL: `HcclCommSymWinGet`).
    ///
    /// Lock-free on success: it reads the registry only (no gate, no lock,
    /// no NCCL call), so it never waits for a pass, a free or a detach.
    /// Error answers may read the registry's comm table under its read lock
    /// to tell "not attached" apart.
    ///
    /// Linearizable against [`free`](Self::free) and
    /// [`detach`](Self::detach): the window returned was recorded for the
    /// comm at some instant during the call, so a lookup that starts after
    /// a free began deregistering the window never returns it. A free that
    /// overlaps the call can still deregister the window before the caller
    /// uses it: freeing a tensor's memory while it is in use is the
    /// caller's race, as with any allocator.
    ///
    /// A comm marked failed keeps the windows it registered before the
    /// failure, and they are returned until it is detached.
    ///
    /// ```
    /// # #[cfg(not(feature = "loom"))] {
    /// use segment_registry_nccl::{allocator::WindowError, sim::SimWorld, Allocator};
    ///
    /// let world = SimWorld::new(1);
    /// let alloc = Allocator::new(world.rank(0).unwrap());
    /// let comm = alloc.attach(world.comm_create(&[0]).unwrap()[0]).unwrap();
    /// let p = alloc.alloc(4 << 20, 0).unwrap();
    /// let t = p + 8192; // a tensor carved out of the allocation
    /// assert!(matches!(alloc.window_of(comm, t, 1024), Err(WindowError::NotRegistered { .. })));
    /// alloc.register(comm).unwrap();
    /// let hit = alloc.window_of(comm, t, 1024).unwrap();
    /// assert_eq!((hit.offset, hit.segment.addr), (8192, p));
    /// alloc.free(p).unwrap();
    /// assert!(matches!(alloc.window_of(comm, t, 1024), Err(WindowError::NotTracked { .. })));
    /// # }
    /// ```
    pub fn window_of(
        &self,
        comm: CommId,
        ptr: usize,
        size: usize,
    ) -> Result<WindowHit, WindowError> {
        let found = self.registry.window_of(comm, ptr, size)?;
        Ok(WindowHit {
            window: found.window,
            offset: found.offset,
            segment: found.segment,
        })
    }

    /// [`window_of`](Self::window_of) for a raw `ncclComm_t`: finds the
    /// comm's id in a lock-free index of attached handles (wait-free, no
    /// lock), then looks the window up. Also lock-free on success, unless
    /// more than 64 comms are attached at once: a comm that found no slot
    /// in the index is looked up in the comm table under its read lock.
    ///
    /// A handle whose comm was detached answers
    /// [`WindowError::UnknownComm`] (or [`WindowError::NotAttached`] when
    /// the detach overlaps the call), never a window of a comm attached
    /// later at the same address.
    pub fn window_of_raw(
        &self,
        comm: RawComm,
        ptr: usize,
        size: usize,
    ) -> Result<WindowHit, WindowError> {
        let id = match self.raw_index.find(comm) {
            RawLookup::Found(id) => id,
            RawLookup::Absent => return Err(WindowError::UnknownComm(comm)),
            RawLookup::Spilled => self.comm_id(comm).ok_or(WindowError::UnknownComm(comm))?,
        };
        self.window_of(id, ptr, size)
    }
}
