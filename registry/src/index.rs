//! The address index: an ordered map from a segment's start address to its
//! node, behind a small trait so that the loom models can swap the
//! skiplist (which loom cannot run) for a model index, while the protocol
//! code stays the same.

use std::ops::Bound;
use std::ptr::NonNull;

use crossbeam_epoch as epoch;
use crossbeam_skiplist::base::SkipList;

/// An opaque, copyable reference to a segment node, as the index stores it.
///
/// The index never dereferences it; the registry alone decides when the node
/// it names may be freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeRef(NonNull<()>);

impl NodeRef {
    pub(crate) fn from_ptr<T>(p: *const T) -> Self {
        NodeRef(NonNull::new(p as *mut ()).expect("node pointers are never null"))
    }

    pub(crate) fn as_ptr<T>(self) -> *const T {
        self.0.as_ptr() as *const T
    }
}

// SAFETY: a `NodeRef` is an address; sending it does not give access to the
// node, and every dereference is made by the registry under its protocol.
unsafe impl Send for NodeRef {}
// SAFETY: as above.
unsafe impl Sync for NodeRef {}

/// An ordered, concurrent map from start address to node, as the registry
/// needs it.
///
/// Implementations must be linearizable; each method is one linearizable
/// operation except the iterations, which are weakly consistent (they see
/// every entry present for their whole duration and none absent for it).
pub trait AddressIndex: Send + Sync {
    /// Creates an empty index.
    fn new() -> Self
    where
        Self: Sized;

    /// Inserts `key → node` if `key` is absent; otherwise returns the node
    /// already there, unchanged.
    fn insert(&self, key: usize, node: NodeRef) -> Result<(), NodeRef>;

    /// Removes `key` only if it still maps to `node`; `true` if this call
    /// removed it (exactly one concurrent caller gets `true`).
    fn remove(&self, key: usize, node: NodeRef) -> bool;

    /// The node at exactly `key`.
    fn get(&self, key: usize) -> Option<NodeRef>;

    /// Finds the node at exactly `key` and calls `f` on it; if `f` returns
    /// `true`, removes that very entry as [`remove`](Self::remove) would.
    /// `None` if `key` is absent, else whether this call removed the entry.
    /// An index that can remove through the entry it found overrides this
    /// to save the second search.
    fn get_then_remove(&self, key: usize, f: &mut dyn FnMut(NodeRef) -> bool) -> Option<bool> {
        let node = self.get(key)?;
        Some(f(node) && self.remove(key, node))
    }

    /// The entry with the greatest key strictly below `key`.
    fn below(&self, key: usize) -> Option<(usize, NodeRef)>;

    /// The entry with the greatest key at or below `key`.
    fn at_or_below(&self, key: usize) -> Option<(usize, NodeRef)>;

    /// Calls `f` on the entries with `lo < key < hi`, in key order, until it
    /// returns `false`.
    fn for_each_between(&self, lo: usize, hi: usize, f: &mut dyn FnMut(usize, NodeRef) -> bool);

    /// Calls `f` on every entry in key order until it returns `false`.
    fn for_each(&self, f: &mut dyn FnMut(usize, NodeRef) -> bool);
}

/// The production index: a `crossbeam-skiplist` [`SkipList`] on
/// crossbeam-epoch's default collector.
///
/// It uses the skiplist's guard-based API (no reference-counted entries):
/// each method pins the current thread, which is a counter bump when the
/// registry has already pinned it. Removal goes through `Entry::remove`,
/// which is exact under concurrency (`SkipMap::remove(&k)` in 0.1.3 can
/// report success to two racing callers).
pub struct SkipIndex {
    list: SkipList<usize, NodeRef>,
}

impl AddressIndex for SkipIndex {
    fn new() -> Self {
        SkipIndex {
            list: SkipList::new(epoch::default_collector().clone()),
        }
    }

    fn insert(&self, key: usize, node: NodeRef) -> Result<(), NodeRef> {
        let guard = &epoch::pin();
        let e = self.list.get_or_insert(key, node, guard);
        let found = *e.value();
        e.release(guard);
        if found == node {
            Ok(())
        } else {
            Err(found)
        }
    }

    fn remove(&self, key: usize, node: NodeRef) -> bool {
        let guard = &epoch::pin();
        match self.list.get(&key, guard) {
            Some(e) if *e.value() == node => e.remove(),
            _ => false,
        }
    }

    fn get(&self, key: usize) -> Option<NodeRef> {
        let guard = &epoch::pin();
        self.list.get(&key, guard).map(|e| *e.value())
    }

    fn get_then_remove(&self, key: usize, f: &mut dyn FnMut(NodeRef) -> bool) -> Option<bool> {
        let guard = &epoch::pin();
        let e = self.list.get(&key, guard)?;
        // `Entry::remove` removes this entry only (by identity), and reports
        // success to exactly one caller.
        Some(f(*e.value()) && e.remove())
    }

    fn below(&self, key: usize) -> Option<(usize, NodeRef)> {
        let guard = &epoch::pin();
        self.list
            .upper_bound(Bound::Excluded(&key), guard)
            .map(|e| (*e.key(), *e.value()))
    }

    fn at_or_below(&self, key: usize) -> Option<(usize, NodeRef)> {
        let guard = &epoch::pin();
        self.list
            .upper_bound(Bound::Included(&key), guard)
            .map(|e| (*e.key(), *e.value()))
    }

    fn for_each_between(&self, lo: usize, hi: usize, f: &mut dyn FnMut(usize, NodeRef) -> bool) {
        if lo >= hi {
            return;
        }
        let guard = &epoch::pin();
        for e in self
            .list
            .range((Bound::Excluded(lo), Bound::Excluded(hi)), guard)
        {
            if !f(*e.key(), *e.value()) {
                break;
            }
        }
    }

    fn for_each(&self, f: &mut dyn FnMut(usize, NodeRef) -> bool) {
        let guard = &epoch::pin();
        for e in self.list.iter(guard) {
            if !f(*e.key(), *e.value()) {
                break;
            }
        }
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;

    fn n(i: usize) -> NodeRef {
        NodeRef::from_ptr((0x1000 * i) as *const u8)
    }

    /// The entries with `lo < key < hi`, in order.
    fn between(ix: &dyn AddressIndex, lo: usize, hi: usize) -> Vec<usize> {
        let mut keys = Vec::new();
        ix.for_each_between(lo, hi, &mut |k, _| {
            keys.push(k);
            true
        });
        keys
    }

    /// Every contract of the trait, on `ix` (empty).
    fn contract(ix: &dyn AddressIndex) {
        for k in [30, 10, 20, 40] {
            assert_eq!(ix.insert(k, n(k)), Ok(()));
        }
        assert_eq!(ix.insert(20, n(99)), Err(n(20)), "present: unchanged");
        assert_eq!(ix.get(20), Some(n(20)));
        assert_eq!(ix.get(25), None);
        assert_eq!(ix.below(20), Some((10, n(10))));
        assert_eq!(ix.below(10), None);
        assert_eq!(ix.at_or_below(20), Some((20, n(20))));
        assert_eq!(ix.at_or_below(25), Some((20, n(20))));
        assert_eq!(ix.at_or_below(9), None);
        assert_eq!(between(ix, 10, 40), [20, 30], "bounds excluded");
        assert_eq!(between(ix, 40, 10), Vec::<usize>::new());
        let mut first = Vec::new();
        ix.for_each_between(0, 100, &mut |k, _| {
            first.push(k);
            false
        });
        assert_eq!(first, [10], "stops when told");
        let mut all = Vec::new();
        ix.for_each(&mut |k, v| {
            all.push((k, v));
            true
        });
        assert_eq!(all, [10, 20, 30, 40].map(|k| (k, n(k))));
        assert!(!ix.remove(20, n(99)), "another node at the key: kept");
        assert_eq!(ix.get(20), Some(n(20)));
        assert!(ix.remove(20, n(20)));
        assert!(!ix.remove(20, n(20)), "removed once");
        assert_eq!(ix.get_then_remove(20, &mut |_| true), None, "absent");
        let mut seen = None;
        assert_eq!(
            ix.get_then_remove(30, &mut |v| {
                seen = Some(v);
                false
            }),
            Some(false),
            "declined: kept"
        );
        assert_eq!((seen, ix.get(30)), (Some(n(30)), Some(n(30))));
        assert_eq!(ix.get_then_remove(30, &mut |v| v == n(30)), Some(true));
        assert_eq!(ix.get(30), None);
    }

    #[test]
    fn the_skiplist_index_keeps_every_contract() {
        contract(&SkipIndex::new());
    }

    /// The skiplist without its own `get_then_remove`: the trait's default.
    struct DefaultGetThenRemove(SkipIndex);

    impl AddressIndex for DefaultGetThenRemove {
        fn new() -> Self {
            DefaultGetThenRemove(SkipIndex::new())
        }
        fn insert(&self, key: usize, node: NodeRef) -> Result<(), NodeRef> {
            self.0.insert(key, node)
        }
        fn remove(&self, key: usize, node: NodeRef) -> bool {
            self.0.remove(key, node)
        }
        fn get(&self, key: usize) -> Option<NodeRef> {
            self.0.get(key)
        }
        fn below(&self, key: usize) -> Option<(usize, NodeRef)> {
            self.0.below(key)
        }
        fn at_or_below(&self, key: usize) -> Option<(usize, NodeRef)> {
            self.0.at_or_below(key)
        }
        fn for_each_between(
            &self,
            lo: usize,
            hi: usize,
            f: &mut dyn FnMut(usize, NodeRef) -> bool,
        ) {
            self.0.for_each_between(lo, hi, f)
        }
        fn for_each(&self, f: &mut dyn FnMut(usize, NodeRef) -> bool) {
            self.0.for_each(f)
        }
    }

    #[test]
    fn the_default_get_then_remove_keeps_the_contract() {
        contract(&DefaultGetThenRemove::new());
    }
}
