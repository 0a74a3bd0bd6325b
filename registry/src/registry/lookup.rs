//! Lookups and iteration: `find`, `window_of`, `segments`,
//! `segments_by_seq` (DESIGN.md, "lookup" and "window lookup").

use std::ptr;

use super::Registry;
use crate::error::WindowLookupError;
use crate::index::AddressIndex;
use crate::node::Node;
use crate::pagemap::Probe;
use crate::records::Registration;
use crate::results::WindowRef;
use crate::state::Phase;
use crate::{CommId, Segment};

impl<C, W, I: AddressIndex> Registry<C, W, I> {
    /// The tracked segment that contains `addr`, if any. Lock-free; O(log n).
    pub fn find(&self, addr: usize) -> Option<Segment> {
        let _guard = self.reclaimer.guard();
        self.find_node(addr).map(Node::segment)
    }

    /// The window registered with `comm` for the tracked segment that
    /// contains the whole byte range `[ptr, ptr + size)`, and the offset of
    /// `ptr` in it: what NCCL's device API (`ncclGetLocalPointer(window,
    /// offset)`) needs to address a tensor.
    ///
    /// The answer is lock-free and O(1) through the page map when there is
    /// a window (O(log n) where segments share a granule) and reads no
    /// lock; the error answers that must tell "comm not attached" apart
    /// read the comm table under its read lock. Linearizable against
    /// untrack, forget and passes: a window is returned only while its
    /// segment is live and the window recorded, never once `forget` of the
    /// comm has begun (a lookup after `forget` returned answers
    /// [`WindowLookupError::NotAttached`], also while a pass that `forget`
    /// reported as running is still inside its callback).
    ///
    /// ```
    /// # #[cfg(not(feature = "loom"))] {
    /// use segment_registry::{Registry, WindowLookupError};
    ///
    /// let reg: Registry<(), u64> = Registry::new();
    /// let comm = reg.attach(());
    /// let seg = reg.track(0x20_0000, 0x20_0000).unwrap();
    /// assert!(matches!(
    ///     reg.window_of(comm, 0x20_1000, 64),
    ///     Err(WindowLookupError::NotRegistered { .. })
    /// ));
    /// let _ = reg.register_pending(comm, |_, _| Ok::<_, ()>(Some(7))).unwrap();
    /// let found = reg.window_of(comm, 0x20_1000, 64).unwrap();
    /// assert_eq!((found.window, found.offset, found.segment), (7, 0x1000, seg));
    /// # }
    /// ```
    pub fn window_of(
        &self,
        comm: CommId,
        ptr: usize,
        size: usize,
    ) -> Result<WindowRef<W>, WindowLookupError>
    where
        W: Copy,
    {
        let _guard = self.reclaimer.guard();
        let found = self.find_node(ptr).map(|o| {
            let reg = o.get().records.lookup(comm, self.faults);
            // The segment must still be live after the records were read: a
            // pass may push a record after the segment died, before its
            // untrack closes the list (DESIGN.md, "window lookup").
            let live =
                self.faults.skip_lookup_live_recheck() || o.load_state().phase() == Phase::Live;
            (o.segment(), if live { reg } else { Registration::Closed })
        });
        // Only the error answers read the comm table.
        let not_attached = || !self.comms.read().unwrap().contains_key(&comm);
        let (segment, reg) = match found {
            Some(f) => f,
            None if not_attached() => return Err(WindowLookupError::NotAttached(comm)),
            None => return Err(WindowLookupError::NotTracked { ptr }),
        };
        if ptr.checked_add(size).is_none_or(|end| end > segment.end()) {
            return Err(WindowLookupError::CrossesEnd { ptr, size, segment });
        }
        match reg {
            Registration::Window(window) => Ok(WindowRef {
                window,
                offset: ptr - segment.addr,
                segment,
            }),
            // Untracked since `find_node` saw it live: linearize after that.
            Registration::Closed => Err(WindowLookupError::NotTracked { ptr }),
            Registration::Forgotten => Err(WindowLookupError::NotAttached(comm)),
            _ if not_attached() => Err(WindowLookupError::NotAttached(comm)),
            Registration::NoWindow => Err(WindowLookupError::NoWindow { comm, segment }),
            Registration::None => Err(WindowLookupError::NotRegistered { comm, segment }),
        }
    }

    /// The live node containing `addr`: from the page map when its granule
    /// says, else from the index. The caller holds a guard.
    pub(super) fn find_node(&self, addr: usize) -> Option<&Node<W>> {
        match self.pages.probe(addr) {
            Probe::Empty => None,
            Probe::One(p) => {
                // SAFETY: a node read from a slot by a pinned thread is not
                // freed before the guard drops (DESIGN.md, "Page map").
                let o = unsafe { &*(p as *const Node<W>) };
                // Only live segments count; a dead or not yet live one
                // means no segment contains `addr` now (DESIGN.md, "Page map").
                (o.addr <= addr && addr < o.end() && o.load_state().phase() == Phase::Live)
                    .then_some(o)
            }
            Probe::Ask => self.find_in_index(addr),
        }
    }

    /// The live node containing `addr`, searched in the index. The caller
    /// holds a guard.
    fn find_in_index(&self, addr: usize) -> Option<&Node<W>> {
        let mut key = addr;
        loop {
            let (k, oref) = self.index.at_or_below(key)?;
            // SAFETY: protected by the caller's guard.
            let o = unsafe { &*oref.as_ptr::<Node<W>>() };
            if o.load_state().phase() == Phase::Live {
                // Live segments never overlap, so no live one further left
                // can contain `addr`.
                return (o.end() > addr).then_some(o);
            }
            // A pending, dead or rejected entry can hide a live one.
            key = k.checked_sub(1)?;
        }
    }

    /// Every tracked segment, in address order (weakly consistent).
    pub fn segments(&self) -> Vec<Segment> {
        let _guard = self.reclaimer.guard();
        let mut out = Vec::new();
        self.index.for_each(&mut |_, oref| {
            // SAFETY: protected by the guard.
            let o = unsafe { &*oref.as_ptr::<Node<W>>() };
            if o.load_state().phase() == Phase::Live {
                out.push(o.segment());
            }
            true
        });
        out
    }

    /// Every tracked segment, in seq order (weakly consistent).
    pub fn segments_by_seq(&self) -> Vec<Segment> {
        let _guard = self.reclaimer.guard();
        let mut out = Vec::new();
        self.walk_log(self.head, ptr::null(), |o| {
            if o.load_state().phase() == Phase::Live {
                out.push(o.segment());
            }
        });
        out
    }
}
