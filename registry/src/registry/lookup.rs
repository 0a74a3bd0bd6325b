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

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use crate::pagemap::{Probe, DEFAULT_PAGE_GRANULE as G};
    use crate::Registry;

    type Reg = Registry<u32, u64>;

    /// What the page map says of `addr`.
    fn probe(reg: &Reg, addr: usize) -> Probe {
        reg.pages.probe(addr)
    }

    /// The node address the page map would name for a live segment at `addr`.
    fn node_of(reg: &Reg, addr: usize) -> usize {
        let _guard = reg.reclaimer.guard();
        let o = reg.find_in_index(addr).expect("live");
        o as *const _ as usize
    }

    #[test]
    fn aligned_segments_are_found_through_the_page_map_alone() {
        let reg = Reg::new();
        let base = 0x7000_0000_0000;
        // Adjacent granule-aligned segments of 1, 2 and 3 granules.
        let mut segs = Vec::new();
        let mut at = base;
        for i in 0..9 {
            let len = (1 + i % 3) * G;
            segs.push(reg.track(at, len).unwrap());
            at += len;
        }
        for s in &segs {
            let node = node_of(&reg, s.addr);
            for a in [s.addr, s.addr + s.len / 2, s.addr + s.len - 1] {
                assert_eq!(probe(&reg, a), Probe::One(node), "{a:#x} of {s:?}");
                assert_eq!(reg.find(a), Some(*s));
            }
        }
        assert_eq!(probe(&reg, base - 1), Probe::Empty);
        assert_eq!(probe(&reg, at), Probe::Empty);
        // Leaving empties exactly their granules; the neighbours stay single.
        for s in segs.iter().step_by(2) {
            drop(reg.untrack(s.addr).unwrap());
        }
        for (i, s) in segs.iter().enumerate() {
            let want = if i % 2 == 0 {
                Probe::Empty
            } else {
                Probe::One(node_of(&reg, s.addr))
            };
            for a in [s.addr, s.addr + s.len - 1] {
                assert_eq!(probe(&reg, a), want, "{a:#x} of {s:?}");
            }
        }
    }

    #[test]
    fn a_segment_alone_in_its_granule_ends_where_it_ends() {
        // The slot names the segment for its whole granule: the lookup
        // itself must refuse the addresses past its end.
        let reg = Reg::new();
        let base = 0x7200_0000_0000;
        let s = reg.track(base + 4096, G / 2).unwrap();
        assert_eq!(probe(&reg, s.end()), Probe::One(node_of(&reg, s.addr)));
        assert_eq!(reg.find(s.end() - 1), Some(s));
        assert_eq!(reg.find(s.end()), None, "one past the end");
        assert_eq!(reg.find(base + 4095), None, "one before the start");
        assert_eq!(reg.find(base + G - 1), None);
    }

    #[test]
    fn unaligned_sharers_go_to_the_index_and_a_survivor_is_found() {
        let reg = Reg::new();
        let base = 0x7100_0000_0000;
        let a = reg.track(base, G / 2).unwrap();
        let b = reg.track(base + G / 2, G).unwrap(); // shares granules 0 and 1
        let c = reg.track(base + 3 * G / 2, G / 2).unwrap(); // shares granule 1
        assert_eq!(probe(&reg, base), Probe::Ask);
        assert_eq!(probe(&reg, base + G), Probe::Ask);
        assert_eq!(reg.find(base + G / 2 + 7), Some(b));
        drop(reg.untrack(b.addr).unwrap());
        // Each granule keeps a count of one: asked, and answered right.
        assert_eq!(probe(&reg, base), Probe::Ask);
        assert_eq!(reg.find(base + 1), Some(a));
        assert_eq!(reg.find(base + G / 2), None);
        assert_eq!(reg.find(base + 3 * G / 2), Some(c));
        drop(reg.untrack(a.addr).unwrap());
        drop(reg.untrack(c.addr).unwrap());
        assert_eq!(probe(&reg, base), Probe::Empty);
        assert_eq!(probe(&reg, base + G), Probe::Empty);
    }

    #[test]
    fn segments_at_and_across_the_map_limit_are_found_through_the_index() {
        // The map covers addresses below 2^48 (three levels of 9 bits of
        // 2 MiB granules); above it every lookup asks the index.
        let reg = Reg::new();
        let limit = 1usize << 48;
        let across = reg.track(limit - G, 2 * G).unwrap();
        let above = reg.track(limit + G, G).unwrap();
        let below = reg.track(limit - 3 * G, G).unwrap();
        assert_eq!(
            probe(&reg, limit - G),
            Probe::One(node_of(&reg, across.addr))
        );
        // Granule 2^27 would index the table of granule 0: nothing there.
        assert_eq!(
            (probe(&reg, 0), probe(&reg, G)),
            (Probe::Empty, Probe::Empty)
        );
        assert_eq!(probe(&reg, limit), Probe::Ask);
        assert_eq!(probe(&reg, limit + G), Probe::Ask);
        assert_eq!(reg.find(limit - 1), Some(across));
        assert_eq!(reg.find(limit + G - 1), Some(across));
        assert_eq!(reg.find(limit + G), Some(above));
        assert_eq!(reg.find(limit - 3 * G), Some(below));
        assert_eq!(reg.find(limit - 2 * G), None);
        drop(reg.untrack(across.addr).unwrap());
        assert_eq!(probe(&reg, limit - G), Probe::Empty);
        assert_eq!(reg.find(limit), None);
        assert_eq!(reg.find(limit + G), Some(above));
    }
}
