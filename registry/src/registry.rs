//! The registry itself: its fields, construction and teardown. Each
//! operation lives in a module of its own beside this one (track, untrack,
//! the log, lookups, comms, passes, stats); DESIGN.md has the protocol and
//! a map from each step to its file.

use std::collections::BTreeMap;

use crate::counters::Counters;
use crate::faults::{NaiveSeq, Switches};
use crate::index::{AddressIndex, SkipIndex};
use crate::node::{untag, Node};
use crate::pagemap::{PageMap, DEFAULT_PAGE_GRANULE};
use crate::state::State;
use crate::sync::{Arc, AtomicPtr, AtomicU64, Ordering, Reclaimer, RwLock};
use crate::CommId;

mod checked;
mod comms;
mod log;
mod lookup;
mod pass;
mod stats;
mod track;
mod untrack;

use comms::{CommSlot, RegistryOrphans};

/// Dead nodes the log may carry beyond half the live count before an
/// untrack sweeps it (DESIGN.md, "Bounded memory").
pub const SWEEP_SLACK: usize = 64;

/// A concurrent registry of memory segments with per-comm watermarks.
///
/// `C` is the payload a comm is attached with (for NCCL, the raw
/// `ncclComm_t`); `W` is the window handle a registration returns; `I` is the
/// address index (the crossbeam skiplist unless a model swaps it).
///
/// ```
/// # #[cfg(not(feature = "loom"))] {
/// use segment_registry::Registry;
///
/// let reg: Registry<&str, u32> = Registry::new();
/// let a = reg.track(0x1000, 0x100).unwrap();
/// let comm = reg.attach("world");
///
/// // The pass registers every segment the comm has not seen, in seq order.
/// let report = reg
///     .register_pending(comm, |_payload, seg| Ok::<_, ()>(Some(seg.seq as u32)))
///     .unwrap();
/// assert_eq!(report.registered, vec![a]);
///
/// // Untrack hands back the windows to deregister before freeing.
/// let gone = reg.untrack(0x1000).unwrap();
/// assert_eq!(gone.windows, vec![(comm, a.seq as u32)]);
/// assert!(gone.pass_hold.is_none()); // no pass holds it: free it now
/// # }
/// ```
pub struct Registry<C, W, I: AddressIndex = SkipIndex> {
    index: I,
    /// Containing-address lookups in O(1) (DESIGN.md, "Page map").
    pages: PageMap,
    /// The log's sentinel head (seq 0, live forever, never in the index).
    head: *mut Node<W>,
    /// The log's tail hint: the last node or the one before it.
    tail: AtomicPtr<Node<W>>,
    comms: RwLock<BTreeMap<CommId, Arc<CommSlot<C, W>>>>,
    next_comm: AtomicU64,
    /// The naive negative control's seq counter (test-support only).
    naive_seq: NaiveSeq,
    sweep_slack: usize,
    /// What panicking passes of forgotten comms could not report; see
    /// [`Registry::take_orphans`].
    orphans: std::sync::Mutex<RegistryOrphans<W>>,
    counters: std::sync::Arc<Counters>,
    reclaimer: Reclaimer,
    faults: Switches,
}

// SAFETY: the raw pointers are to nodes the registry owns and shares only
// through its protocol; payloads are shared (`C: Sync`) and sent (`C: Send`),
// windows are moved between threads (`W: Send`).
unsafe impl<C: Send + Sync, W: Send, I: AddressIndex> Send for Registry<C, W, I> {}
// SAFETY: as above.
unsafe impl<C: Send + Sync, W: Send, I: AddressIndex> Sync for Registry<C, W, I> {}

impl<C, W> Registry<C, W, SkipIndex> {
    /// An empty registry on the crossbeam skiplist.
    pub fn new() -> Self {
        Self::with_index()
    }
}

impl<C, W> Default for Registry<C, W, SkipIndex> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C, W, I: AddressIndex> Registry<C, W, I> {
    /// An empty registry on the index `I`.
    pub fn with_index() -> Self {
        Self::build(Switches::default())
    }

    /// A registry that runs the deliberately broken variants in `faults`
    /// (negative controls for the test suites).
    #[cfg(feature = "test-support")]
    pub fn with_faults(faults: crate::Faults) -> Self {
        Self::build(Switches::new(faults))
    }

    /// Sets how many dead nodes the log may carry beyond half the live
    /// count before an untrack sweeps it (default [`SWEEP_SLACK`]). Smaller
    /// means tighter memory and more frequent sweeps; the models use 0.
    pub fn with_sweep_slack(mut self, slack: usize) -> Self {
        self.sweep_slack = slack;
        self
    }

    /// Sets the granule of the page map that answers containing-address
    /// lookups ([`find`](Self::find), [`window_of`](Self::window_of)) in
    /// O(1): [`DEFAULT_PAGE_GRANULE`] (2 MiB, `ncclMemAlloc`'s granularity)
    /// unless set. Rounded up to a power of two; `0` turns the map off, and
    /// every lookup then searches the skiplist.
    ///
    /// Lookups in a granule that one segment has to itself are one radix
    /// walk; a granule shared by several segments (segments not aligned to
    /// the granule) falls back to the skiplist. Each track and untrack
    /// writes one slot per granule its segment overlaps, and the map takes
    /// 4 KiB per 512 granules that ever held a segment.
    ///
    /// ```
    /// # #[cfg(not(feature = "loom"))] {
    /// use segment_registry::Registry;
    ///
    /// // Segments of a 64 KiB-granule allocator.
    /// let reg: Registry<(), u64> = Registry::new().with_page_granule(64 << 10);
    /// let seg = reg.track(0x7f00_0001_0000, 0x3_0000).unwrap();
    /// assert_eq!(reg.find(0x7f00_0002_1234), Some(seg));
    /// # }
    /// ```
    pub fn with_page_granule(mut self, granule: usize) -> Self {
        self.pages = PageMap::new(granule);
        // Publish what is tracked already (we own the registry: no race).
        let _guard = self.reclaimer.guard();
        let pages = &self.pages;
        self.index.for_each(&mut |_, oref| {
            let p = oref.as_ptr::<Node<W>>();
            // SAFETY: protected by the guard.
            let o = unsafe { &*p };
            if o.load_state().is_committed() {
                pages.publish(o.addr, o.end(), p as usize, Switches::default());
            }
            true
        });
        self
    }

    /// The page map's granule in bytes (0: off); see
    /// [`with_page_granule`](Self::with_page_granule).
    pub fn page_granule(&self) -> usize {
        self.pages.granule()
    }

    fn build(faults: Switches) -> Self {
        let head = Box::into_raw(Box::new(Node::new(0, 0, State::sentinel())));
        Registry {
            index: I::new(),
            pages: PageMap::new(DEFAULT_PAGE_GRANULE),
            head,
            tail: AtomicPtr::new(head),
            comms: RwLock::new(BTreeMap::new()),
            next_comm: AtomicU64::new(0),
            naive_seq: NaiveSeq::default(),
            sweep_slack: SWEEP_SLACK,
            orphans: std::sync::Mutex::new(RegistryOrphans {
                handed_back: Vec::new(),
                free_now: Vec::new(),
            }),
            counters: std::sync::Arc::new(Counters::default()),
            reclaimer: Default::default(),
            faults,
        }
    }
}

impl<C, W, I: AddressIndex> Drop for Registry<C, W, I> {
    fn drop(&mut self) {
        // Exclusive access: every node still linked in the log is freed here
        // (retired ones belong to the reclaimer). Comm pins no longer matter.
        let mut cur = self.head;
        while !cur.is_null() {
            // SAFETY: exclusive; every linked node was made by
            // `Box::into_raw` and is in the log once.
            let node = unsafe { Box::from_raw(cur) };
            cur = untag(node.get().next.load(Ordering::Relaxed));
        }
    }
}
