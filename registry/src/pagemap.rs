//! The page map: containing-address lookups in O(1) (DESIGN.md, "Page map").
//!
//! A radix table keyed by the allocation granule (2 MiB by default, the
//! granule of `ncclMemAlloc`), as allocators keep one (jemalloc's rtree,
//! tcmalloc's PageMap). Each granule's slot says which committed segments
//! overlap that granule:
//!
//! | slot value | meaning |
//! | --- | --- |
//! | `0` | no committed segment overlaps the granule |
//! | a node pointer | that node's segment is the only one (the node may be dead, not yet withdrawn) |
//! | `(k << 1) \| 1` | k ≥ 1 segments overlap it (unaligned segments sharing a granule): ask the skiplist |
//!
//! A segment publishes itself in every granule it overlaps after its track
//! commits and before it can become live, and withdraws after its untrack
//! made it dead; the sweeper does not retire a node before its withdrawal
//! (the state word's `WITHDRAWN` bit), so a pointer read from a slot by a
//! pinned thread is never freed under it. Only a node adds or removes its
//! own share of a slot, so counts are exact. The skiplist stays the
//! authority on order and overlap; the map only answers "which segment
//! contains this address".
//!
//! Tables are allocated on first use and freed with the map: 4 KiB per
//! 512 granules (1 GiB of address space at 2 MiB) that ever held a segment.

use crate::faults::Switches;
use crate::sync::{AtomicUsize, Ordering};

/// Bits of the granule number each level resolves.
#[cfg(not(feature = "loom"))]
const LEVEL_BITS: u32 = 9;
/// Levels of the table: 3 × 9 bits of granule number, i.e. addresses below
/// 2^48 at the default granule. Higher addresses go to the skiplist.
#[cfg(not(feature = "loom"))]
const LEVELS: u32 = 3;
// Under loom: two levels of four slots (16 granules), so that a model
// creates few atomics and still exercises table creation.
#[cfg(feature = "loom")]
const LEVEL_BITS: u32 = 2;
#[cfg(feature = "loom")]
const LEVELS: u32 = 2;

const FANOUT: usize = 1 << LEVEL_BITS;

/// The default granule: 2 MiB, `ncclMemAlloc`'s allocation granularity.
pub const DEFAULT_PAGE_GRANULE: usize = 2 << 20;

/// One level of the radix table: child tables (inner levels) or slots
/// (the last level), as `usize`s.
struct Table {
    entries: [AtomicUsize; FANOUT],
}

// Tables made minus tables freed on this thread, for the tests' leak check
// (plain `cargo test` has no leak detector; the ASan stage has one).
#[cfg(all(test, not(feature = "loom")))]
thread_local! {
    static LIVE_TABLES: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
}

impl Table {
    fn new_boxed() -> *mut Table {
        #[cfg(all(test, not(feature = "loom")))]
        LIVE_TABLES.with(|n| n.set(n.get() + 1));
        Box::into_raw(Box::new(Table {
            entries: std::array::from_fn(|_| AtomicUsize::new(0)),
        }))
    }
}

/// What a granule's slot says about an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Probe {
    /// No committed segment overlaps the granule.
    Empty,
    /// Only this node's segment overlaps it (the node may be dead).
    One(usize),
    /// Several segments share the granule, or the address is beyond the
    /// map (or the map is off): ask the index.
    Ask,
}

/// A slot's count form.
#[inline]
fn count(k: usize) -> usize {
    (k << 1) | 1
}

#[inline]
fn is_count(v: usize) -> bool {
    v & 1 == 1
}

/// The radix table. See the module documentation.
pub(crate) struct PageMap {
    /// log2 of the granule; `None` when the map is off (every lookup asks
    /// the index).
    shift: Option<u32>,
    root: *mut Table,
}

// SAFETY: the raw root pointer is owned by the map and every table is only
// reached through atomics; tables are freed only by `Drop` (`&mut self`).
unsafe impl Send for PageMap {}
// SAFETY: as above.
unsafe impl Sync for PageMap {}

impl PageMap {
    /// A map of granule `granule` bytes rounded up to a power of two; `0`
    /// turns the map off.
    pub(crate) fn new(granule: usize) -> Self {
        let shift = (granule != 0).then(|| {
            granule
                .checked_next_power_of_two()
                .map_or(usize::BITS - 1, usize::trailing_zeros)
        });
        PageMap {
            shift,
            root: Table::new_boxed(),
        }
    }

    /// The granule in bytes, or 0 when the map is off.
    pub(crate) fn granule(&self) -> usize {
        self.shift.map_or(0, |s| 1 << s)
    }

    /// The granule numbers `[first, last]` the map covers of `[addr, end)`
    /// (`end > addr`), or `None` if it covers none of them.
    fn granules(&self, addr: usize, end: usize) -> Option<(usize, usize)> {
        let shift = self.shift?;
        let limit = 1usize << (LEVEL_BITS * LEVELS);
        let first = addr >> shift;
        let last = ((end - 1) >> shift).min(limit - 1);
        (first < limit).then_some((first, last))
    }

    /// The last-level table that holds granule `g`'s slot, creating the
    /// tables on the way if `create`.
    fn leaf(&self, g: usize, create: bool) -> Option<&Table> {
        let mut table = self.root;
        for level in (1..LEVELS).rev() {
            let i = (g >> (level * LEVEL_BITS)) & (FANOUT - 1);
            // SAFETY: `table` is the root or a child published below; tables
            // live as long as the map.
            let entry = unsafe { &(*table).entries[i] };
            // Acquire: see the child table's initialised slots.
            let mut child = entry.load(Ordering::Acquire) as *mut Table;
            if child.is_null() {
                if !create {
                    return None;
                }
                let fresh = Table::new_boxed();
                // Release: publish the fresh table's slots. Acquire on
                // failure: see the winner's.
                match entry.compare_exchange(
                    0,
                    fresh as usize,
                    Ordering::Release,
                    Ordering::Acquire,
                ) {
                    Ok(_) => child = fresh,
                    Err(won) => {
                        // SAFETY: `fresh` was never shared.
                        drop(unsafe { Box::from_raw(fresh) });
                        child = won as *mut Table;
                    }
                }
            }
            table = child;
        }
        // SAFETY: as above.
        Some(unsafe { &*table })
    }

    /// Calls `f` on the slot of every granule in `[first, last]`, walking
    /// down the table once per last-level table (512 granules).
    fn for_each_slot(
        &self,
        first: usize,
        last: usize,
        create: bool,
        mut f: impl FnMut(usize, &AtomicUsize),
    ) {
        let mut g = first;
        while g <= last {
            let run_end = (g | (FANOUT - 1)).min(last);
            match self.leaf(g, create) {
                Some(t) => {
                    let slots = &t.entries[g & (FANOUT - 1)..=run_end & (FANOUT - 1)];
                    for (slot, g) in slots.iter().zip(g..) {
                        f(g, slot);
                    }
                }
                None => debug_assert!(false, "withdraw from a granule never published"),
            }
            g = run_end + 1;
        }
    }

    /// What granule of `addr` says.
    #[inline]
    pub(crate) fn probe(&self, addr: usize) -> Probe {
        let Some(shift) = self.shift else {
            return Probe::Ask;
        };
        let g = addr >> shift;
        if g >> (LEVEL_BITS * LEVELS) != 0 {
            return Probe::Ask;
        }
        let Some(leaf) = self.leaf(g, false) else {
            return Probe::Empty;
        };
        let slot = &leaf.entries[g & (FANOUT - 1)];
        // SeqCst: the lookup argument (DESIGN.md, "Page map") orders this read in
        // one total order with the publishers' and withdrawers' CASes and
        // the nodes' state changes.
        match slot.load(Ordering::SeqCst) {
            0 => Probe::Empty,
            v if is_count(v) => Probe::Ask,
            p => Probe::One(p),
        }
    }

    /// Publishes `node` (covering `[addr, end)`) in every granule it
    /// overlaps: an empty slot becomes `node`, a slot naming another node
    /// becomes a count of 2, a count grows by one. Every slot therefore
    /// counts exactly the nodes that published there and have not withdrawn
    /// (dead ones included): only a node itself adds or removes its share.
    ///
    /// `faults.page_overwrite()` is the negative control: a granule
    /// the node covers whole is overwritten instead.
    pub(crate) fn publish(&self, addr: usize, end: usize, node: usize, faults: Switches) {
        let overwrite_whole = faults.page_overwrite();
        debug_assert!(node != 0 && !is_count(node));
        let Some((first, last)) = self.granules(addr, end) else {
            return;
        };
        let shift = self.shift.expect("granules() checked it");
        self.for_each_slot(first, last, true, |g, slot| {
            if overwrite_whole && g << shift >= addr && ((g + 1) << shift).wrapping_sub(1) < end {
                // SeqCst: see `probe`.
                slot.store(node, Ordering::SeqCst);
                return;
            }
            // SeqCst: see `probe`.
            let mut cur = slot.load(Ordering::SeqCst);
            loop {
                let new = match cur {
                    0 => node,
                    v if is_count(v) => count((v >> 1) + 1),
                    _ => count(2),
                };
                // SeqCst: see `probe`; on failure we retry with the value.
                match slot.compare_exchange_weak(cur, new, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => break,
                    Err(v) => cur = v,
                }
            }
        });
    }

    /// Withdraws `node` (covering `[addr, end)`) from every granule it
    /// overlaps: a slot naming it becomes empty, a count drops by one (a
    /// count of one becomes empty). Called once per published node.
    pub(crate) fn withdraw(&self, addr: usize, end: usize, node: usize) {
        let Some((first, last)) = self.granules(addr, end) else {
            return;
        };
        self.for_each_slot(first, last, false, |_, slot| {
            // SeqCst: see `probe`.
            let mut cur = slot.load(Ordering::SeqCst);
            loop {
                let new = match cur {
                    v if v == node => 0,
                    v if is_count(v) && v >> 1 == 1 => 0,
                    v if is_count(v) => count((v >> 1) - 1),
                    // Empty, or another node alone: our share is not there,
                    // which only the `page_overwrite` control can cause.
                    _ => break,
                };
                // SeqCst: see `probe`; on failure we retry with the value.
                match slot.compare_exchange_weak(cur, new, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => break,
                    Err(v) => cur = v,
                }
            }
        });
    }
}

impl Drop for PageMap {
    fn drop(&mut self) {
        fn free(t: *mut Table, level: u32) {
            if level > 0 {
                // SAFETY: `&mut` access to the map: no other thread.
                for e in unsafe { &(*t).entries } {
                    // Relaxed: no other thread (we hold `&mut`).
                    let child = e.load(Ordering::Relaxed) as *mut Table;
                    if !child.is_null() {
                        free(child, level - 1);
                    }
                }
            }
            // SAFETY: made by `Box::into_raw`, freed once, here.
            drop(unsafe { Box::from_raw(t) });
            #[cfg(all(test, not(feature = "loom")))]
            LIVE_TABLES.with(|n| n.set(n.get() - 1));
        }
        free(self.root, LEVELS - 1);
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;

    const G: usize = DEFAULT_PAGE_GRANULE;

    #[test]
    fn sole_count_replace_and_withdraw() {
        let m = PageMap::new(G);
        assert_eq!(m.probe(5 * G), Probe::Empty);
        // A segment of three granules.
        m.publish(4 * G, 7 * G, 0x1000, Switches::default());
        for g in 4..7 {
            assert_eq!(m.probe(g * G + 17), Probe::One(0x1000));
        }
        assert_eq!(m.probe(7 * G), Probe::Empty);
        // A second segment sharing granule 6 (unaligned): a count.
        m.publish(6 * G + 64, 8 * G, 0x2000, Switches::default());
        assert_eq!(m.probe(6 * G), Probe::Ask);
        assert_eq!(m.probe(7 * G), Probe::One(0x2000));
        m.withdraw(4 * G, 7 * G, 0x1000);
        assert_eq!(m.probe(4 * G), Probe::Empty);
        assert_eq!(m.probe(6 * G), Probe::Ask, "count 1: identity unknown");
        m.withdraw(6 * G + 64, 8 * G, 0x2000);
        assert_eq!(m.probe(6 * G), Probe::Empty);
        assert_eq!(m.probe(7 * G), Probe::Empty);
        // A node whose predecessor at the same address has not withdrawn
        // yet is counted with it; the count empties only when both left.
        m.publish(G, 2 * G, 0x3000, Switches::default());
        m.publish(G, 2 * G, 0x4000, Switches::default());
        assert_eq!(m.probe(G), Probe::Ask);
        m.withdraw(G, 2 * G, 0x3000);
        assert_eq!(m.probe(G), Probe::Ask, "count 1: identity unknown");
        m.withdraw(G, 2 * G, 0x4000);
        assert_eq!(m.probe(G), Probe::Empty);
    }

    /// The raw value of the slot of `addr`'s granule (0 if no table).
    fn slot(m: &PageMap, addr: usize) -> usize {
        let g = addr / G;
        m.leaf(g, false)
            .map_or(0, |t| t.entries[g & (FANOUT - 1)].load(Ordering::SeqCst))
    }

    #[test]
    fn a_shared_granule_counts_each_sharer_once_and_empties_when_all_left() {
        let m = PageMap::new(G);
        // Three unaligned segments in granule 3, one after the other.
        let segs = [
            (3 * G, 3 * G + 64),
            (3 * G + 64, 3 * G + 128),
            (3 * G + 128, 4 * G),
        ];
        for (i, &(a, e)) in segs.iter().enumerate() {
            m.publish(a, e, 0x1000 * (i + 1), Switches::default());
        }
        assert_eq!(slot(&m, 3 * G), count(3));
        assert_eq!((slot(&m, 2 * G), slot(&m, 4 * G)), (0, 0), "only granule 3");
        m.withdraw(segs[1].0, segs[1].1, 0x2000);
        assert_eq!(slot(&m, 3 * G), count(2));
        m.withdraw(segs[0].0, segs[0].1, 0x1000);
        assert_eq!(slot(&m, 3 * G), count(1));
        assert_eq!(m.probe(3 * G), Probe::Ask, "count 1: identity unknown");
        m.withdraw(segs[2].0, segs[2].1, 0x3000);
        assert_eq!(slot(&m, 3 * G), 0);
        assert_eq!(m.probe(3 * G), Probe::Empty);
    }

    #[test]
    fn aligned_neighbours_each_own_their_granules() {
        // Segments that end and begin on a granule boundary never share a
        // slot: each granule names its one segment (the fast path).
        let m = PageMap::new(G);
        m.publish(2 * G, 3 * G, 0x1000, Switches::default());
        m.publish(3 * G, 5 * G, 0x2000, Switches::default());
        m.publish(G, 2 * G, 0x3000, Switches::default());
        assert_eq!(m.probe(G), Probe::One(0x3000));
        assert_eq!(m.probe(3 * G - 1), Probe::One(0x1000));
        assert_eq!(m.probe(3 * G), Probe::One(0x2000));
        assert_eq!(m.probe(5 * G - 1), Probe::One(0x2000));
        assert_eq!(m.probe(5 * G), Probe::Empty);
    }

    /// The scenario of the `page_overwrite` control: M shares granule 0
    /// (count 1 once its neighbour K left) and is dead but not withdrawn;
    /// Y covers the granule whole and leaves; P and Q share it and Q
    /// leaves; M withdraws last. Returns what the granule says with P live.
    fn late_withdraw(faults: Switches) -> Probe {
        let m = PageMap::new(G);
        let b = 5 * G; // granule 5: not 0, whose shifts hide mistakes
        let (mm, k, y, p, q) = (0x1000, 0x2000, 0x3000, 0x4000, 0x5000);
        m.publish(b, b + 64, mm, faults);
        m.publish(b + 64, b + 128, k, faults);
        m.withdraw(b + 64, b + 128, k);
        m.publish(b, b + G, y, faults);
        m.withdraw(b, b + G, y);
        m.publish(b, b + 64, p, faults);
        m.publish(b + 64, b + 128, q, faults);
        m.withdraw(b + 64, b + 128, q);
        m.withdraw(b, b + 64, mm);
        m.probe(b)
    }

    #[test]
    fn a_late_withdrawal_leaves_a_live_sharers_count() {
        assert_eq!(late_withdraw(Switches::default()), Probe::Ask);
    }

    #[cfg(feature = "test-support")]
    fn page_overwrite() -> Switches {
        Switches::new(crate::Faults {
            page_overwrite: true,
            ..crate::Faults::NONE
        })
    }

    #[cfg(feature = "test-support")]
    #[test]
    fn the_page_overwrite_control_empties_a_live_segments_granule() {
        assert_eq!(late_withdraw(page_overwrite()), Probe::Empty, "P is lost");
    }

    #[cfg(feature = "test-support")]
    #[test]
    fn under_the_page_overwrite_control_a_withdrawal_whose_share_is_gone_changes_nothing() {
        let broken = page_overwrite();
        let m = PageMap::new(G);
        let b = 5 * G;
        // M1 and M2 share granule 5 (count 2), both dead, not withdrawn yet.
        m.publish(b, b + 64, 0x1000, broken);
        m.publish(b + 64, b + 128, 0x2000, broken);
        m.publish(b, b + G, 0x3000, broken); // Y overwrites their shares
        m.withdraw(b, b + 64, 0x1000); // M1 finds Y there
        assert_eq!(m.probe(b), Probe::One(0x3000), "Y keeps the granule");
        m.withdraw(b, b + G, 0x3000);
        m.publish(b, b + 64, 0x4000, broken); // P, alone
        m.withdraw(b + 64, b + 128, 0x2000); // M2 finds P there
        assert_eq!(m.probe(b), Probe::One(0x4000), "P keeps the granule");
        // Only granules covered whole are overwritten; partial ones add.
        let c = 9 * G;
        m.publish(c, c + 64, 0x5000, broken);
        m.publish(c + 64, c + 2 * G, 0x6000, broken); // granule 9 partly, 10 whole
                                                      // Granule 11: the last byte's sharer first, then one that ends a
                                                      // byte short of the granule's end, which must not overwrite it.
        m.publish(c + 3 * G - 1, c + 3 * G, 0x8000, broken);
        m.publish(c + 2 * G, c + 3 * G - 1, 0x7000, broken);
        assert_eq!(slot(&m, c), count(2));
        assert_eq!(m.probe(c + G), Probe::One(0x6000));
        assert_eq!(slot(&m, c + 2 * G), count(2));
    }

    #[test]
    fn dropping_the_map_frees_every_table() {
        let before = LIVE_TABLES.with(|n| n.get());
        {
            let m = PageMap::new(G);
            assert_eq!(LIVE_TABLES.with(|n| n.get()), before + 1, "the root");
            // Three last-level tables under one middle table, and a second
            // middle table: 6 more.
            m.publish(0, G, 0x1000, Switches::default());
            m.publish(
                (FANOUT + 3) * G,
                (2 * FANOUT + 1) * G,
                0x2000,
                Switches::default(),
            );
            m.publish(
                (FANOUT * FANOUT + 7) * G,
                (FANOUT * FANOUT + 8) * G,
                0x3000,
                Switches::default(),
            );
            assert_eq!(LIVE_TABLES.with(|n| n.get()), before + 7);
        }
        assert_eq!(LIVE_TABLES.with(|n| n.get()), before, "tables leaked");
    }

    #[test]
    fn a_segment_across_last_level_tables() {
        let m = PageMap::new(G);
        let (first, last) = (FANOUT - 2, 2 * FANOUT + 1);
        m.publish(first * G, (last + 1) * G, 0x1000, Switches::default());
        for g in first..=last {
            assert_eq!(m.probe(g * G), Probe::One(0x1000), "granule {g}");
        }
        assert_eq!(m.probe((first - 1) * G), Probe::Empty);
        assert_eq!(m.probe((last + 1) * G), Probe::Empty);
        m.withdraw(first * G, (last + 1) * G, 0x1000);
        for g in first..=last {
            assert_eq!(m.probe(g * G), Probe::Empty, "granule {g}");
        }
    }

    #[test]
    fn beyond_the_map_and_off() {
        let m = PageMap::new(G);
        let top = G << (LEVEL_BITS * LEVELS);
        m.publish(top, top + G, 0x1000, Switches::default());
        assert_eq!(m.probe(top), Probe::Ask);
        // A segment straddling the limit is published below it only.
        m.publish(top - G, top + G, 0x2000, Switches::default());
        assert_eq!(m.probe(top - 1), Probe::One(0x2000));
        assert_eq!(m.probe(usize::MAX), Probe::Ask);
        let off = PageMap::new(0);
        off.publish(0, G, 0x1000, Switches::default());
        assert_eq!(off.probe(0), Probe::Ask);
        assert_eq!(off.granule(), 0);
        assert_eq!(PageMap::new(3 << 20).granule(), 4 << 20, "rounded up");
    }
}
