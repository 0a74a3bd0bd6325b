//! The implementations under test, behind one trait.

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crossbeam_skiplist::SkipMap;
use segment_registry::{CommId, Registry};

/// The most comms a baseline with a fixed watermark table can attach.
pub const MAX_COMMS: usize = 64;

/// What every implementation under test offers, in the registry's terms.
///
/// Addresses and lengths are plain `usize`s; a comm is a `u64` handle that
/// [`attach`](SegmentMap::attach) returns. Operations that an implementation
/// does not have return `None` and are reported as "n/a".
pub trait SegmentMap: Send + Sync + Sized + 'static {
    /// The row label in every table.
    const NAME: &'static str;

    /// An empty map.
    fn new() -> Self;

    /// Tracks `[addr, addr + len)`; `false` if it was refused.
    fn track(&self, addr: usize, len: usize) -> bool;

    /// Untracks the segment that starts at `addr`; `false` if unknown.
    fn untrack(&self, addr: usize) -> bool;

    /// The start of the tracked segment that contains `addr`.
    fn lookup(&self, addr: usize) -> Option<usize>;

    /// Collects every segment in address order; returns how many.
    fn by_address(&self) -> usize;

    /// Collects every segment in seq (track) order; returns how many.
    fn by_seq(&self) -> Option<usize>;

    /// Attaches a comm.
    fn attach(&self) -> Option<u64>;

    /// Runs a registration pass for `comm`: "registers" (see
    /// [`register_window`]) every segment it has not seen; returns how many.
    fn pass(&self, comm: u64) -> Option<usize>;

    /// The window lookup of issue 9, `(comm, ptr, size) -> (window,
    /// offset)`: the window that a pass of `comm` recorded (see
    /// [`register_window`]) for the live segment containing the whole range
    /// `[addr, addr + size)`, and the offset of `addr` in that segment.
    ///
    /// `None` if no live segment contains `addr`, if the range runs past the
    /// segment's end, or if `comm` has not registered the segment. The
    /// default, for implementations that keep no windows, always answers
    /// `None`; [`has_window_of`] tells them apart ("n/a" in the tables).
    fn window_of(&self, comm: u64, addr: usize, size: usize) -> Option<(u64, usize)> {
        let _ = (comm, addr, size);
        None
    }

    /// Lets deferred frees that earlier operations left behind run now, so
    /// that the next measurement does not pay for them (epoch-based
    /// implementations hand that work to whichever thread pins next).
    fn settle(&self) {}
}

/// The registration callback every pass calls: stands in for
/// `ncclCommWindowRegister` and returns a window handle. Opaque to the
/// optimiser so that no implementation can skip it.
#[inline]
pub fn register_window(addr: usize, len: usize) -> u64 {
    black_box((addr ^ len.rotate_left(17)) as u64)
}

/// Whether `M` answers [`SegmentMap::window_of`]: a one-segment map, one
/// comm and one pass, then a lookup that must find the window.
pub fn has_window_of<M: SegmentMap>() -> bool {
    const ADDR: usize = 0x7f00_0000_0000;
    const LEN: usize = 2 << 20;
    let m = M::new();
    let Some(comm) = m.attach() else {
        return false;
    };
    m.track(ADDR, LEN) && m.pass(comm) == Some(1) && m.window_of(comm, ADDR + 64, 64).is_some()
}

/// Calls [`ImplVisitor::visit`] once per implementation, in table order.
pub trait ImplVisitor {
    /// Runs the visitor's work on `M`.
    fn visit<M: SegmentMap>(&mut self);
}

/// Visits every implementation, the registry first.
pub fn visit_all(v: &mut impl ImplVisitor) {
    v.visit::<RegistryMap>();
    v.visit::<SglangVec>();
    v.visit::<MutexBTree>();
    v.visit::<SccTree>();
    v.visit::<RawSkipMap>();
}

/// The row labels, in table order.
pub const NAMES: [&str; 5] = [
    RegistryMap::NAME,
    SglangVec::NAME,
    MutexBTree::NAME,
    SccTree::NAME,
    RawSkipMap::NAME,
];

// --------------------------------------------------------------------------
// The registry
// --------------------------------------------------------------------------

/// [`segment_registry::Registry`] on its production skiplist index, with a
/// `u64` comm payload and `u64` windows. Its passes record every window, as
/// the glue does; its untracks claim them back.
pub struct RegistryMap {
    reg: Registry<u64, u64>,
}

impl RegistryMap {
    /// The registry inside (for figures such as [`Registry::flush`]).
    pub fn registry(&self) -> &Registry<u64, u64> {
        &self.reg
    }
}

impl SegmentMap for RegistryMap {
    const NAME: &'static str = "registry";

    fn new() -> Self {
        RegistryMap {
            reg: Registry::new(),
        }
    }

    fn track(&self, addr: usize, len: usize) -> bool {
        self.reg.track(addr, len).is_ok()
    }

    fn untrack(&self, addr: usize) -> bool {
        match self.reg.untrack(addr) {
            Ok(gone) => {
                black_box(&gone.windows);
                if let Some(hold) = gone.pass_hold {
                    let _free_now = hold.release();
                }
                true
            }
            Err(_) => false,
        }
    }

    fn lookup(&self, addr: usize) -> Option<usize> {
        self.reg.find(addr).map(|s| s.addr)
    }

    fn by_address(&self) -> usize {
        black_box(self.reg.segments()).len()
    }

    fn by_seq(&self) -> Option<usize> {
        Some(black_box(self.reg.segments_by_seq()).len())
    }

    fn attach(&self) -> Option<u64> {
        Some(self.reg.attach(0).0)
    }

    fn pass(&self, comm: u64) -> Option<usize> {
        let result = self.reg.register_pending(CommId(comm), |_payload, seg| {
            Ok::<_, ()>(Some(register_window(seg.addr, seg.len)))
        });
        match result {
            Ok(report) => {
                let n = report.registered.len();
                for hb in report.handed_back {
                    let _free_now = hb.hold.release();
                }
                Some(n)
            }
            Err(failure) => panic!("registry pass failed: {:?}", failure.error),
        }
    }

    fn window_of(&self, comm: u64, addr: usize, size: usize) -> Option<(u64, usize)> {
        self.reg
            .window_of(CommId(comm), addr, size)
            .ok()
            .map(|w| (w.window, w.offset))
    }

    fn settle(&self) {
        // Each flush seals this thread's garbage and frees at most 8 expired
        // bags (crossbeam-epoch's COLLECT_STEPS); repeat until every node the
        // registry retired is freed, or the count stops moving.
        let mut last = u64::MAX;
        for _ in 0..10_000 {
            for _ in 0..64 {
                self.reg.flush();
            }
            let nodes = self.reg.stats().nodes;
            if nodes.freed >= nodes.retired || nodes.freed == last {
                break;
            }
            last = nodes.freed;
        }
    }
}

// --------------------------------------------------------------------------
// SGLang's design
// --------------------------------------------------------------------------

#[derive(Default)]
struct SglangInner {
    /// Tracked `(ptr, len)`, in track order.
    segments: Vec<(usize, usize)>,
    /// Per comm: how many entries of `segments` it has registered.
    watermarks: HashMap<u64, usize>,
    next_comm: u64,
}

/// SGLang's design (PR #21392): one `Mutex<Vec<(ptr, len)>>`, an index
/// watermark per comm in a `HashMap`, a linear search and `Vec::remove` on
/// free, and — as SGLang does, because erasing shifts every index — every
/// watermark reset on free, so the next pass of each comm re-registers
/// everything. The search on free starts from the newest entry (as likely
/// to be freed as any other, and cheaper for short-lived buffers). The lock is held across the registration callbacks. No
/// overlap check; windows are not kept.
#[derive(Default)]
pub struct SglangVec {
    inner: Mutex<SglangInner>,
}

impl SegmentMap for SglangVec {
    const NAME: &'static str = "sglang-vec";

    fn new() -> Self {
        Self::default()
    }

    fn track(&self, addr: usize, len: usize) -> bool {
        self.inner.lock().unwrap().segments.push((addr, len));
        true
    }

    fn untrack(&self, addr: usize) -> bool {
        let mut g = self.inner.lock().unwrap();
        match g.segments.iter().rposition(|&(a, _)| a == addr) {
            Some(i) => {
                g.segments.remove(i);
                g.watermarks.clear();
                true
            }
            None => false,
        }
    }

    fn lookup(&self, addr: usize) -> Option<usize> {
        let g = self.inner.lock().unwrap();
        g.segments
            .iter()
            .find(|&&(a, l)| a <= addr && addr - a < l)
            .map(|&(a, _)| a)
    }

    fn by_address(&self) -> usize {
        let mut v = self.inner.lock().unwrap().segments.clone();
        v.sort_unstable();
        black_box(v).len()
    }

    fn by_seq(&self) -> Option<usize> {
        let v = self.inner.lock().unwrap().segments.clone();
        Some(black_box(v).len())
    }

    fn attach(&self) -> Option<u64> {
        let mut g = self.inner.lock().unwrap();
        g.next_comm += 1;
        Some(g.next_comm)
    }

    fn pass(&self, comm: u64) -> Option<usize> {
        let mut g = self.inner.lock().unwrap();
        let SglangInner {
            segments,
            watermarks,
            ..
        } = &mut *g;
        let wm = watermarks.entry(comm).or_insert(0);
        let todo = &segments[*wm..];
        for &(a, l) in todo {
            register_window(a, l);
        }
        let n = todo.len();
        *wm = segments.len();
        Some(n)
    }
}

// --------------------------------------------------------------------------
// Mutex<BTreeMap>
// --------------------------------------------------------------------------

/// One segment of [`MutexBTree`]'s address map.
struct BSeg {
    len: usize,
    seq: u64,
    /// `(comm, window)` per comm whose pass registered the segment, in pass
    /// order. A boxed slice: empty (no allocation) until the first pass,
    /// then one allocation of 16 bytes per comm, like the registry's one
    /// record per (segment, comm); 16 bytes in the node either way.
    windows: Box<[(u64, u64)]>,
}

#[derive(Default)]
struct BTreeInner {
    /// addr -> (len, seq, windows)
    by_addr: BTreeMap<usize, BSeg>,
    /// seq -> (addr, len)
    by_seq: BTreeMap<u64, (usize, usize)>,
    next_seq: u64,
    /// Per comm: the highest seq registered.
    watermarks: HashMap<u64, u64>,
    next_comm: u64,
}

/// One `Mutex` over a `BTreeMap` keyed by address (with an overlap check on
/// track) and a `BTreeMap` keyed by seq for passes, with a seq watermark per
/// comm. The lock is held across the registration callbacks. Like the
/// registry, a pass records each window it gets in the segment's address
/// entry (one more `BTreeMap` descent per registered segment), untrack drops
/// them, and [`window_of`](SegmentMap::window_of) answers from the address
/// map under the lock: predecessor, containment of the whole range, then a
/// linear search of the segment's `(comm, window)` pairs.
#[derive(Default)]
pub struct MutexBTree {
    inner: Mutex<BTreeInner>,
}

impl SegmentMap for MutexBTree {
    const NAME: &'static str = "mutex-btreemap";

    fn new() -> Self {
        Self::default()
    }

    fn track(&self, addr: usize, len: usize) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        let mut g = self.inner.lock().unwrap();
        if let Some((&a, s)) = g.by_addr.range(..=addr).next_back() {
            if a + s.len > addr {
                return false;
            }
        }
        if g.by_addr.range(addr..end).next().is_some() {
            return false;
        }
        g.next_seq += 1;
        let seq = g.next_seq;
        g.by_addr.insert(
            addr,
            BSeg {
                len,
                seq,
                windows: Box::default(),
            },
        );
        g.by_seq.insert(seq, (addr, len));
        true
    }

    fn untrack(&self, addr: usize) -> bool {
        let mut g = self.inner.lock().unwrap();
        match g.by_addr.remove(&addr) {
            Some(seg) => {
                g.by_seq.remove(&seg.seq);
                black_box(&seg.windows);
                true
            }
            None => false,
        }
    }

    fn lookup(&self, addr: usize) -> Option<usize> {
        let g = self.inner.lock().unwrap();
        g.by_addr
            .range(..=addr)
            .next_back()
            .filter(|(&a, s)| addr - a < s.len)
            .map(|(&a, _)| a)
    }

    fn by_address(&self) -> usize {
        let g = self.inner.lock().unwrap();
        let v: Vec<(usize, usize)> = g.by_addr.iter().map(|(&a, s)| (a, s.len)).collect();
        black_box(v).len()
    }

    fn by_seq(&self) -> Option<usize> {
        let g = self.inner.lock().unwrap();
        let v: Vec<(usize, usize)> = g.by_seq.values().copied().collect();
        Some(black_box(v).len())
    }

    fn attach(&self) -> Option<u64> {
        let mut g = self.inner.lock().unwrap();
        g.next_comm += 1;
        Some(g.next_comm)
    }

    fn pass(&self, comm: u64) -> Option<usize> {
        let mut g = self.inner.lock().unwrap();
        let BTreeInner {
            by_addr,
            by_seq,
            watermarks,
            ..
        } = &mut *g;
        let wm = watermarks.entry(comm).or_insert(0);
        let mut n = 0;
        for (&seq, &(a, l)) in by_seq.range(*wm + 1..) {
            let window = register_window(a, l);
            let seg = by_addr.get_mut(&a).expect("by_seq and by_addr agree");
            let mut windows = std::mem::take(&mut seg.windows).into_vec();
            windows.push((comm, window));
            seg.windows = windows.into_boxed_slice();
            *wm = seq;
            n += 1;
        }
        Some(n)
    }

    fn window_of(&self, comm: u64, addr: usize, size: usize) -> Option<(u64, usize)> {
        let g = self.inner.lock().unwrap();
        let (&a, seg) = g.by_addr.range(..=addr).next_back()?;
        let offset = addr - a;
        if offset >= seg.len || size > seg.len - offset {
            return None;
        }
        seg.windows
            .iter()
            .find(|&&(c, _)| c == comm)
            .map(|&(_, w)| (w, offset))
    }
}

// --------------------------------------------------------------------------
// scc::TreeIndex
// --------------------------------------------------------------------------

/// Two `scc::TreeIndex`es — address → (len, seq) and seq → (addr, len) —
/// with a `fetch_add` seq and a seq watermark per comm, the same logic as
/// [`MutexBTree`] without the lock. Track does a best-effort (not atomic)
/// overlap check; passes for one comm are assumed not to run concurrently.
/// This is the naive concurrent design the registry's log replaces: it can
/// miss a segment whose insertion is still in flight, which the benchmarks
/// do not exercise.
pub struct SccTree {
    by_addr: scc::TreeIndex<usize, (usize, u64)>,
    by_seq: scc::TreeIndex<u64, (usize, usize)>,
    next_seq: AtomicU64,
    next_comm: AtomicU64,
    watermarks: Box<[AtomicU64]>,
}

impl SegmentMap for SccTree {
    const NAME: &'static str = "scc-treeindex";

    fn new() -> Self {
        SccTree {
            by_addr: scc::TreeIndex::new(),
            by_seq: scc::TreeIndex::new(),
            next_seq: AtomicU64::new(0),
            next_comm: AtomicU64::new(0),
            watermarks: (0..MAX_COMMS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn track(&self, addr: usize, len: usize) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        {
            let guard = scc::Guard::new();
            if let Some((a, l)) = self.at_or_below(addr, &guard) {
                if a + l > addr {
                    return false;
                }
            }
            if self.by_addr.range(addr..end, &guard).next().is_some() {
                return false;
            }
        }
        // Relaxed: uniqueness only (the naive design: see the type's docs).
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed) + 1;
        if self.by_addr.insert_sync(addr, (len, seq)).is_err() {
            return false;
        }
        let _ = self.by_seq.insert_sync(seq, (addr, len));
        true
    }

    fn untrack(&self, addr: usize) -> bool {
        let mut seq = 0;
        let removed = self.by_addr.remove_if_sync(&addr, |&(_, s)| {
            seq = s;
            true
        });
        if removed {
            self.by_seq.remove_sync(&seq);
        }
        removed
    }

    fn lookup(&self, addr: usize) -> Option<usize> {
        let guard = scc::Guard::new();
        self.at_or_below(addr, &guard)
            .filter(|&(a, l)| addr - a < l)
            .map(|(a, _)| a)
    }

    fn by_address(&self) -> usize {
        let guard = scc::Guard::new();
        let v: Vec<(usize, usize)> = self
            .by_addr
            .iter(&guard)
            .map(|(&a, &(l, _))| (a, l))
            .collect();
        black_box(v).len()
    }

    fn by_seq(&self) -> Option<usize> {
        let guard = scc::Guard::new();
        let v: Vec<(usize, usize)> = self.by_seq.iter(&guard).map(|(_, &v)| v).collect();
        Some(black_box(v).len())
    }

    fn attach(&self) -> Option<u64> {
        // Relaxed: uniqueness only.
        let id = self.next_comm.fetch_add(1, Ordering::Relaxed);
        assert!((id as usize) < MAX_COMMS, "too many comms for the baseline");
        Some(id)
    }

    fn pass(&self, comm: u64) -> Option<usize> {
        let wm = &self.watermarks[comm as usize];
        // Acquire/Release: hand the watermark from one pass to the next.
        let mut last = wm.load(Ordering::Acquire);
        let guard = scc::Guard::new();
        let mut n = 0;
        for (&seq, &(a, l)) in self.by_seq.range(last + 1.., &guard) {
            register_window(a, l);
            last = seq;
            n += 1;
        }
        wm.store(last, Ordering::Release);
        Some(n)
    }

    fn settle(&self) {
        // Fresh guards advance scc's epoch; a few epochs free what is due.
        for _ in 0..4 {
            let guard = scc::Guard::new();
            guard.accelerate();
            let epoch = guard.epoch();
            drop(guard);
            for _ in 0..1_000_000 {
                if scc::Guard::new().epoch() != epoch {
                    break;
                }
            }
        }
    }
}

impl SccTree {
    /// The entry with the greatest address at or below `addr`, as
    /// `(addr, len)`. `locate` is scc's predecessor search: O(log n), where
    /// `range(..=addr).next_back()` walks the leaves when `addr` is above
    /// every key (quadratic when segments are tracked in address order).
    fn at_or_below(&self, addr: usize, guard: &scc::Guard) -> Option<(usize, usize)> {
        use scc::tree_index::Proximity;
        let entry = match self.by_addr.locate(&addr, guard) {
            Proximity::Exact(it) | Proximity::Between(it) => it.get(),
            Proximity::Smaller(it) => it.get_back(),
            _ => None,
        };
        entry.map(|(&a, &(l, _))| (a, l))
    }
}

// --------------------------------------------------------------------------
// Raw SkipMap
// --------------------------------------------------------------------------

/// A bare `crossbeam_skiplist::SkipMap<addr, len>` doing only the key
/// operations (`insert`, `remove`, `upper_bound`, `iter`): no overlap check,
/// no log, no windows, no passes. The floor the registry's index costs.
pub struct RawSkipMap {
    map: SkipMap<usize, usize>,
}

impl SegmentMap for RawSkipMap {
    const NAME: &'static str = "raw-skipmap";

    fn new() -> Self {
        RawSkipMap {
            map: SkipMap::new(),
        }
    }

    fn track(&self, addr: usize, len: usize) -> bool {
        self.map.insert(addr, len);
        true
    }

    fn untrack(&self, addr: usize) -> bool {
        self.map.remove(&addr).is_some()
    }

    fn lookup(&self, addr: usize) -> Option<usize> {
        self.map
            .upper_bound(Bound::Included(&addr))
            .filter(|e| addr - *e.key() < *e.value())
            .map(|e| *e.key())
    }

    fn by_address(&self) -> usize {
        let v: Vec<(usize, usize)> = self.map.iter().map(|e| (*e.key(), *e.value())).collect();
        black_box(v).len()
    }

    fn by_seq(&self) -> Option<usize> {
        None
    }

    fn attach(&self) -> Option<u64> {
        None
    }

    fn pass(&self, _comm: u64) -> Option<usize> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB2: usize = 2 << 20;

    fn check<M: SegmentMap>() {
        let m = M::new();
        assert!(m.track(10 * MIB2, 2 * MIB2));
        assert!(m.track(20 * MIB2, MIB2));
        assert!(m.track(4 * MIB2, MIB2));
        assert_eq!(m.lookup(10 * MIB2 + 5), Some(10 * MIB2));
        assert_eq!(m.lookup(12 * MIB2 - 1), Some(10 * MIB2));
        assert_eq!(m.lookup(12 * MIB2), None);
        assert_eq!(m.lookup(MIB2), None);
        assert_eq!(m.by_address(), 3);
        let comm = m.attach();
        if let Some(c) = comm {
            assert_eq!(m.by_seq(), Some(3));
            assert_eq!(m.pass(c), Some(3));
            assert_eq!(m.pass(c), Some(0));
            assert!(m.track(30 * MIB2, MIB2));
            assert_eq!(m.pass(c), Some(1));
        }
        assert!(m.untrack(20 * MIB2));
        assert!(!m.untrack(20 * MIB2));
        assert_eq!(m.lookup(20 * MIB2), None);
        if let Some(c) = comm {
            let expect = if M::NAME == SglangVec::NAME { 3 } else { 0 };
            assert_eq!(m.pass(c), Some(expect), "{}", M::NAME);
            assert!(m.untrack(4 * MIB2));
            assert!(m.track(4 * MIB2, MIB2));
            let expect = if M::NAME == SglangVec::NAME { 3 } else { 1 };
            assert_eq!(m.pass(c), Some(expect), "{}", M::NAME);
        }
    }

    struct Check;
    impl ImplVisitor for Check {
        fn visit<M: SegmentMap>(&mut self) {
            check::<M>();
        }
    }

    #[test]
    fn every_implementation_agrees_on_a_small_script() {
        visit_all(&mut Check);
    }

    fn check_window_of<M: SegmentMap>() {
        let m = M::new();
        if !has_window_of::<M>() {
            let c = m.attach();
            assert!(m.track(10 * MIB2, 2 * MIB2));
            if let Some(c) = c {
                let _ = m.pass(c);
                assert_eq!(m.window_of(c, 10 * MIB2, 1), None, "{}", M::NAME);
            }
            return;
        }
        let (c1, c2) = (m.attach().unwrap(), m.attach().unwrap());
        assert!(m.track(10 * MIB2, 2 * MIB2));
        assert!(m.track(20 * MIB2, MIB2));
        // Tracked, not registered yet.
        assert_eq!(m.window_of(c1, 10 * MIB2, 64), None, "{}", M::NAME);
        assert_eq!(m.pass(c1), Some(2));
        let w10 = register_window(10 * MIB2, 2 * MIB2);
        let w20 = register_window(20 * MIB2, MIB2);
        assert_eq!(m.window_of(c1, 10 * MIB2 + 256, 64), Some((w10, 256)));
        // The whole segment; one byte more crosses the end.
        assert_eq!(m.window_of(c1, 10 * MIB2, 2 * MIB2), Some((w10, 0)));
        assert_eq!(m.window_of(c1, 10 * MIB2 + 1, 2 * MIB2), None);
        assert_eq!(
            m.window_of(c1, 20 * MIB2 + MIB2 - 1, 1),
            Some((w20, MIB2 - 1))
        );
        // Between segments, after the last one, or another comm's.
        assert_eq!(m.window_of(c1, 12 * MIB2, 1), None);
        assert_eq!(m.window_of(c1, 30 * MIB2, 1), None);
        assert_eq!(m.window_of(c2, 10 * MIB2, 1), None, "{}", M::NAME);
        assert_eq!(m.pass(c2), Some(2));
        assert_eq!(m.window_of(c2, 20 * MIB2, 8), Some((w20, 0)));
        assert_eq!(m.window_of(c1, 20 * MIB2, 8), Some((w20, 0)));
        // Untracked: gone for every comm; re-tracked: pending again.
        assert!(m.untrack(20 * MIB2));
        assert_eq!(m.window_of(c1, 20 * MIB2, 8), None);
        assert_eq!(m.window_of(c2, 20 * MIB2, 8), None);
        assert!(m.track(20 * MIB2, MIB2));
        assert_eq!(m.window_of(c1, 20 * MIB2, 8), None, "{}", M::NAME);
        assert_eq!(m.pass(c1), Some(1));
        assert_eq!(m.window_of(c1, 20 * MIB2, 8), Some((w20, 0)));
    }

    struct CheckWindows(Vec<&'static str>);
    impl ImplVisitor for CheckWindows {
        fn visit<M: SegmentMap>(&mut self) {
            check_window_of::<M>();
            if has_window_of::<M>() {
                self.0.push(M::NAME);
            }
        }
    }

    #[test]
    fn window_of_agrees_where_it_exists() {
        let mut v = CheckWindows(Vec::new());
        visit_all(&mut v);
        assert_eq!(v.0, [RegistryMap::NAME, MutexBTree::NAME]);
    }

    #[test]
    fn overlap_checking_implementations_refuse_overlaps() {
        let r = RegistryMap::new();
        assert!(r.track(4 * MIB2, 2 * MIB2));
        assert!(!r.track(5 * MIB2, MIB2));
        let b = MutexBTree::new();
        assert!(b.track(4 * MIB2, 2 * MIB2));
        assert!(!b.track(5 * MIB2, MIB2));
        let s = SccTree::new();
        assert!(s.track(4 * MIB2, 2 * MIB2));
        assert!(!s.track(5 * MIB2, MIB2));
    }
}
