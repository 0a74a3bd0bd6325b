//! Raw `ncclComm_t` handle → comm id, readable without a lock, for
//! [`Allocator::window_of_raw`](super::Allocator::window_of_raw).

// Under loom the seqlock's atomics are loom's, for the model at the end of
// this file; the writers' mutex stays std (the model has one writer).
#[cfg(feature = "loom")]
use loom::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(feature = "loom"))]
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use segment_registry::CommId;

use crate::backend::RawComm;
use crate::util::lock;

/// Slots of the lock-free raw handle → comm id index. Comms attached beyond
/// this many are found through the comm table (under its read lock).
const RAW_SLOTS: usize = 64;

/// One attached comm of the index: a seqlock over `(raw, id)`. `seq` is odd
/// while a writer changes the pair; `raw == 0` marks a free slot.
struct RawSlot {
    seq: AtomicU64,
    raw: AtomicUsize,
    id: AtomicU64,
}

/// What [`RawIndex::find`] knows about a raw handle.
pub(super) enum RawLookup {
    /// Attached with this id (at some instant during the call).
    Found(CommId),
    /// Not attached (at some instant during the call).
    Absent,
    /// Not in the slots, but some attached comm has no slot: ask the table.
    Spilled,
}

/// Raw handle → comm id, readable without a lock (for
/// [`Allocator::window_of_raw`](super::Allocator::window_of_raw)). Writers
/// (attach, the end of detach, an abort at a deadline, which may run
/// under the comm table's read lock) are serialized by `writer`.
///
/// Readers never wait: a slot that is being written, or that changes while
/// it is read, is skipped. That is linearizable because a slot changes only
/// when its comm is attached or detached: a reader that overlaps the change
/// may answer as if it came before the attach or after the detach. Ids are
/// never reused, so an id found for a handle whose comm was detached
/// meanwhile makes the registry answer "not attached", never another comm's
/// window.
pub(super) struct RawIndex {
    slots: Box<[RawSlot]>,
    /// Slots ever used: readers scan `[0, used)`.
    used: AtomicUsize,
    /// Attached comms that found no free slot.
    spilled: AtomicUsize,
    /// Held by every writer: one at a time.
    writer: Mutex<()>,
}

impl RawIndex {
    pub(super) fn new() -> Self {
        RawIndex {
            slots: (0..RAW_SLOTS)
                .map(|_| RawSlot {
                    seq: AtomicU64::new(0),
                    raw: AtomicUsize::new(0),
                    id: AtomicU64::new(0),
                })
                .collect(),
            used: AtomicUsize::new(0),
            spilled: AtomicUsize::new(0),
            writer: Mutex::new(()),
        }
    }

    /// Seqlock write of one slot. The caller holds `writer`.
    fn write(slot: &RawSlot, raw: usize, id: u64) {
        // Relaxed: writers are serialized by `writer`.
        let s = slot.seq.load(Ordering::Relaxed);
        slot.seq.store(s + 1, Ordering::Relaxed);
        // Release fence: a reader that sees a new `raw`/`id` below also sees
        // the odd `seq` (it re-reads `seq` after an acquire fence).
        fence(Ordering::Release);
        // Relaxed: published by the release store of `seq` below.
        slot.raw.store(raw, Ordering::Relaxed);
        slot.id.store(id, Ordering::Relaxed);
        // Release: a reader that sees `s + 2` sees the pair written above.
        slot.seq.store(s + 2, Ordering::Release);
    }

    /// Records an attached comm.
    pub(super) fn insert(&self, raw: RawComm, id: CommId) {
        let _writer = lock(&self.writer);
        // Relaxed: only writers (serialized by `writer`) change `raw`.
        let free = self
            .slots
            .iter()
            .position(|s| s.raw.load(Ordering::Relaxed) == 0);
        match free {
            Some(i) => {
                Self::write(&self.slots[i], raw.0, id.0);
                // Release: a reader that scans up to `i` sees the slot's
                // writes (made before).
                self.used.fetch_max(i + 1, Ordering::Release);
            }
            None => {
                // SeqCst: rare; ordered with the readers' miss check.
                self.spilled.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Forgets a detached (or aborted) comm: the slot of `(raw, id)`; the
    /// caller removes each comm once. A new comm may hold `raw` already
    /// (NCCL reuses a freed comm's address), so the id must match too.
    pub(super) fn remove(&self, raw: RawComm, id: CommId) {
        let _writer = lock(&self.writer);
        // Relaxed: as in `insert`.
        let slot = self.slots.iter().find(|s| {
            s.raw.load(Ordering::Relaxed) == raw.0 && s.id.load(Ordering::Relaxed) == id.0
        });
        match slot {
            Some(s) => Self::write(s, 0, 0),
            None => {
                // SeqCst: as in `insert`.
                self.spilled.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// The id of an attached raw handle. Wait-free; no lock.
    pub(super) fn find(&self, raw: RawComm) -> RawLookup {
        // Acquire: pairs with `insert`'s release.
        let used = self.used.load(Ordering::Acquire);
        for slot in &self.slots[..used] {
            // Acquire: pairs with the writer's final release store.
            let s1 = slot.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                continue; // being attached or detached: see the type docs
            }
            // Relaxed: validated by the `seq` re-read below.
            if slot.raw.load(Ordering::Relaxed) != raw.0 {
                continue;
            }
            // Relaxed: as above.
            let id = slot.id.load(Ordering::Relaxed);
            // Acquire fence: orders the loads above before the re-read.
            fence(Ordering::Acquire);
            // Relaxed: ordered by the fence.
            if slot.seq.load(Ordering::Relaxed) == s1 {
                return RawLookup::Found(CommId(id));
            }
        }
        // SeqCst: rare path; a spill made before our call is seen.
        if self.spilled.load(Ordering::SeqCst) > 0 {
            RawLookup::Spilled
        } else {
            RawLookup::Absent
        }
    }
}

/// The id `find` gives `raw`, `None` if absent (the tests spill nothing).
#[cfg(test)]
fn id_of(index: &RawIndex, raw: usize) -> Option<u64> {
    match index.find(RawComm(raw)) {
        RawLookup::Found(id) => Some(id.0),
        RawLookup::Absent => None,
        RawLookup::Spilled => panic!("nothing spilled"),
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;

    /// A removal takes out the slot of that handle *and* id: a comm
    /// attached at the same address keeps its own.
    #[test]
    fn a_removal_takes_out_only_its_own_handle_and_id() {
        let index = RawIndex::new();
        index.insert(RawComm(0x10), CommId(1));
        index.insert(RawComm(0x10), CommId(2));
        index.insert(RawComm(0x20), CommId(3));
        index.remove(RawComm(0x10), CommId(2));
        assert_eq!(id_of(&index, 0x10), Some(1));
        assert_eq!(id_of(&index, 0x20), Some(3));
        index.remove(RawComm(0x10), CommId(1));
        assert_eq!(id_of(&index, 0x10), None);
    }
}

/// The seqlock under loom: a reader racing a writer that reuses a slot
/// never sees the new handle with the old id (or the old with the new).
#[cfg(all(test, feature = "loom"))]
mod loom_model {
    use loom::sync::Arc;

    use super::*;

    #[test]
    fn a_reader_never_sees_a_torn_handle_and_id() {
        loom::model(|| {
            let index = Arc::new(RawIndex::new());
            index.insert(RawComm(0x10), CommId(1));
            let writer = index.clone();
            // Detach comm 1, then attach comm 2 in the slot it freed.
            let t = loom::thread::spawn(move || {
                writer.remove(RawComm(0x10), CommId(1));
                writer.insert(RawComm(0x20), CommId(2));
            });
            let new = id_of(&index, 0x20);
            assert!(new.is_none() || new == Some(2), "{new:?}");
            let old = id_of(&index, 0x10);
            assert!(old.is_none() || old == Some(1), "{old:?}");
            t.join().unwrap();
            assert_eq!(id_of(&index, 0x20), Some(2));
        });
    }
}
