//! Window lookup: which window of a comm covers a tensor, at which offset
//! (HCCL's `HcclCommSymWinGet`), from the registry alone.

use segment_registry::{CommId, WindowLookupError, WindowRef};

use super::raw_index::RawLookup;
use super::Allocator;
use crate::backend::{Backend, RawComm, Window};

/// Why [`Allocator::window_of_raw`] returned no window: no attached comm
/// has the raw handle, or the registry's answer for the comm that has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// No attached comm has this raw handle.
    #[error("{0:?} is not attached")]
    UnknownComm(RawComm),
    /// The registry's answer ([`Allocator::window_of`]'s).
    #[error(transparent)]
    Lookup(#[from] WindowLookupError),
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
    /// use segment_registry_nccl::{sim::SimWorld, Allocator, WindowLookupError};
    ///
    /// let world = SimWorld::new(1);
    /// let alloc = Allocator::new(world.rank(0).unwrap());
    /// let comm = alloc.attach(world.comm_create(&[0]).unwrap()[0]).unwrap();
    /// let p = alloc.alloc(4 << 20, 0).unwrap();
    /// let t = p + 8192; // a tensor carved out of the allocation
    /// assert!(matches!(alloc.window_of(comm, t, 1024), Err(WindowLookupError::NotRegistered { .. })));
    /// alloc.register(comm).unwrap();
    /// let hit = alloc.window_of(comm, t, 1024).unwrap();
    /// assert_eq!((hit.offset, hit.segment.addr), (8192, p));
    /// alloc.free(p).unwrap();
    /// assert!(matches!(alloc.window_of(comm, t, 1024), Err(WindowLookupError::NotTracked { .. })));
    /// # }
    /// ```
    pub fn window_of(
        &self,
        comm: CommId,
        ptr: usize,
        size: usize,
    ) -> Result<WindowRef<Window>, WindowLookupError> {
        self.registry.window_of(comm, ptr, size)
    }

    /// [`window_of`](Self::window_of) for a raw `ncclComm_t`: finds the
    /// comm's id in a lock-free index of attached handles (wait-free, no
    /// lock), then looks the window up. Also lock-free on success, unless
    /// more than 64 comms are attached at once: a comm that found no slot
    /// in the index is looked up in the comm table under its read lock.
    ///
    /// A handle whose comm was detached answers
    /// [`WindowError::UnknownComm`] (or the registry's
    /// [`WindowLookupError::NotAttached`] when the detach overlaps the call),
    /// never a window of a comm attached later at the same address.
    pub fn window_of_raw(
        &self,
        comm: RawComm,
        ptr: usize,
        size: usize,
    ) -> Result<WindowRef<Window>, WindowError> {
        let id = match self.raw_index.find(comm) {
            RawLookup::Found(id) => id,
            RawLookup::Absent => return Err(WindowError::UnknownComm(comm)),
            RawLookup::Spilled => self.comm_id(comm).ok_or(WindowError::UnknownComm(comm))?,
        };
        Ok(self.window_of(id, ptr, size)?)
    }
}
