//! Loom models of the segment registry's protocol (DESIGN.md, "Model
//! checking"; the models themselves are in `tests/models/`, one module per
//! guarantee).
//!
//! Loom cannot run the crossbeam skiplist, so the models run the registry on
//! [`ModelIndex`]: a fixed array of slots built from loom atomics only, with
//! orderings no stronger than a skiplist's (Acquire loads, AcqRel CAS). There
//! is deliberately no lock in it: a lock would order the overlap scan after
//! a racing insert and hide a missing `fence(SeqCst)` in the protocol.
//!
//! [`Model`] runs one model under `loom::model::Builder` with an explicit
//! preemption bound, counts the executions inside the model closure and
//! prints the count and the time.
//!
//! Without the `loom` feature the index uses `std` atomics (its plain unit
//! tests run then) and the models compile out.

use std::any::Any;
use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicPtr as StdAtomicPtr, AtomicUsize, Ordering as StdOrdering};
use std::sync::{Arc, Mutex, Once};
use std::time::Instant;

#[cfg(feature = "loom")]
use loom::sync::atomic::{AtomicPtr, Ordering};
#[cfg(not(feature = "loom"))]
use std::sync::atomic::{AtomicPtr, Ordering};

use segment_registry::{AddressIndex, NodeRef};

/// Number of slots, hence of distinct start addresses, in a [`ModelIndex`].
pub const SLOTS: usize = 4;
/// The key of slot 0. Small, so that with a page granule of [`STRIDE`] the
/// grid lies inside the registry's loom-sized page map (16 granules).
pub const BASE: usize = 0x4000;
/// The distance between the keys of two neighbouring slots.
pub const STRIDE: usize = 0x1000;

/// The start address that slot `i` of a [`ModelIndex`] holds.
pub const fn slot_addr(i: usize) -> usize {
    BASE + i * STRIDE
}

/// The slot that holds `key`, if `key` is on the grid.
fn slot_of(key: usize) -> Option<usize> {
    let off = key.checked_sub(BASE)?;
    (off % STRIDE == 0 && off / STRIDE < SLOTS).then_some(off / STRIDE)
}

/// One published mapping. Entries are never freed before the index is, so a
/// pointer to one names it for good (no ABA on the slot CAS).
struct Entry {
    node: NodeRef,
    /// The next entry in the list of every entry ever published (for
    /// `Drop`); bookkeeping only, outside the model.
    all_next: StdAtomicPtr<Entry>,
}

/// A loom-friendly [`AddressIndex`]: slot `i` holds the key
/// [`slot_addr(i)`](slot_addr), as a loom `AtomicPtr` to an entry naming
/// the node (null when empty).
///
/// * insert: CAS empty → entry (AcqRel; Acquire on failure);
/// * remove: load (Acquire), compare the node, CAS entry → empty (AcqRel);
/// * lookups and ordered iteration: Acquire loads of the slots in key order.
///
/// Each single-key operation is one atomic step, hence linearizable; the
/// scans are weakly consistent, like the skiplist's. Keys must lie on the
/// grid (`insert` panics otherwise: a model set up wrongly); lookups accept
/// any key.
pub struct ModelIndex {
    slots: [AtomicPtr<Entry>; SLOTS],
    /// Every entry ever published, freed on drop. A `std` atomic: it is
    /// bookkeeping that adds no synchronization to the model (loom runs one
    /// thread at a time).
    all: StdAtomicPtr<Entry>,
}

impl ModelIndex {
    fn entry(&self, slot: usize) -> Option<NodeRef> {
        // Acquire: see the entry published by the inserting CAS.
        let p = self.slots[slot].load(Ordering::Acquire);
        // SAFETY: a non-null slot points to an entry published by `insert`,
        // and entries live until the index is dropped.
        (!p.is_null()).then(|| unsafe { (*p).node })
    }

    /// The entry with the greatest key at or below slot `hi` (inclusive).
    fn scan_down(&self, hi: usize) -> Option<(usize, NodeRef)> {
        (0..=hi)
            .rev()
            .find_map(|i| self.entry(i).map(|n| (slot_addr(i), n)))
    }

    /// Remembers a published entry so that `Drop` frees it.
    fn keep(&self, e: *mut Entry) {
        // Bookkeeping outside the model: a std Treiber push. AcqRel/Acquire
        // make it correct on real threads too (the plain unit tests).
        let mut head = self.all.load(StdOrdering::Acquire);
        loop {
            // SAFETY: `e` is a live entry; `all_next` is only read by `Drop`.
            unsafe { &*e }.all_next.store(head, StdOrdering::Relaxed);
            match self
                .all
                .compare_exchange(head, e, StdOrdering::AcqRel, StdOrdering::Acquire)
            {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }
}

impl AddressIndex for ModelIndex {
    fn new() -> Self {
        ModelIndex {
            slots: std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            all: StdAtomicPtr::new(ptr::null_mut()),
        }
    }

    fn insert(&self, key: usize, node: NodeRef) -> Result<(), NodeRef> {
        let slot = slot_of(key)
            .unwrap_or_else(|| panic!("model index: key {key:#x} is not on the model grid"));
        let e = Box::into_raw(Box::new(Entry {
            node,
            all_next: StdAtomicPtr::new(ptr::null_mut()),
        }));
        // AcqRel: Release publishes the entry; Acquire (also on failure)
        // sees the entry already there.
        match self.slots[slot].compare_exchange(
            ptr::null_mut(),
            e,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                self.keep(e);
                Ok(())
            }
            Err(cur) => {
                // SAFETY: `e` was never shared; take it back.
                drop(unsafe { Box::from_raw(e) });
                // SAFETY: a non-null slot value is a published entry, alive
                // until the index is dropped.
                Err(unsafe { (*cur).node })
            }
        }
    }

    fn remove(&self, key: usize, node: NodeRef) -> bool {
        let Some(slot) = slot_of(key) else {
            return false;
        };
        // Acquire: see the entry's node.
        let cur = self.slots[slot].load(Ordering::Acquire);
        // SAFETY: as in `entry`.
        if cur.is_null() || unsafe { (*cur).node } != node {
            return false;
        }
        // AcqRel: one winner among racing removers (entries are never
        // reused, so the pointer names this very mapping).
        self.slots[slot]
            .compare_exchange(cur, ptr::null_mut(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn get(&self, key: usize) -> Option<NodeRef> {
        self.entry(slot_of(key)?)
    }

    fn below(&self, key: usize) -> Option<(usize, NodeRef)> {
        self.at_or_below(key.checked_sub(1)?)
    }

    fn at_or_below(&self, key: usize) -> Option<(usize, NodeRef)> {
        let off = key.checked_sub(BASE)?;
        self.scan_down((off / STRIDE).min(SLOTS - 1))
    }

    fn for_each_between(&self, lo: usize, hi: usize, f: &mut dyn FnMut(usize, NodeRef) -> bool) {
        for i in 0..SLOTS {
            let k = slot_addr(i);
            if k <= lo {
                continue;
            }
            if k >= hi {
                break;
            }
            if let Some(n) = self.entry(i) {
                if !f(k, n) {
                    break;
                }
            }
        }
    }

    fn for_each(&self, f: &mut dyn FnMut(usize, NodeRef) -> bool) {
        for i in 0..SLOTS {
            if let Some(n) = self.entry(i) {
                if !f(slot_addr(i), n) {
                    break;
                }
            }
        }
    }
}

impl Drop for ModelIndex {
    fn drop(&mut self) {
        let mut cur = self.all.load(StdOrdering::Acquire);
        while !cur.is_null() {
            // SAFETY: exclusive access; every entry on the list was made by
            // `Box::into_raw`, published once, and is freed once here.
            let e = unsafe { Box::from_raw(cur) };
            cur = e.all_next.load(StdOrdering::Relaxed);
        }
    }
}

/// One loom model run: a name, a preemption bound and a branch limit.
#[derive(Clone, Copy, Debug)]
pub struct Model {
    name: &'static str,
    preemption_bound: usize,
    max_branches: usize,
}

impl Model {
    /// A model called `name`, explored with at most `preemption_bound`
    /// preemptions per execution.
    pub fn new(name: &'static str, preemption_bound: usize) -> Self {
        Model {
            name,
            preemption_bound,
            max_branches: 2_000,
        }
    }

    /// Raises loom's limit on branch points per execution (each atomic
    /// operation is one), for models with a long single-threaded set-up.
    pub fn max_branches(mut self, n: usize) -> Self {
        self.max_branches = n;
        self
    }

    fn builder(&self) -> loom::model::Builder {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(self.preemption_bound);
        builder.max_branches = self.max_branches;
        // Exhaustive within the bound, whatever the environment says.
        builder.max_duration = None;
        builder.max_permutations = None;
        builder.checkpoint_file = None;
        builder
    }

    /// Explores every execution of `body` within the bound. `runs` counts
    /// the executions (incremented inside the model closure); the count, the
    /// bound and the time are printed when the exploration ends, also when
    /// it ends with a failure.
    pub fn check<F>(self, runs: &'static AtomicUsize, body: F)
    where
        F: Fn() + Sync + Send + 'static,
    {
        let _report = Report::new(self, runs);
        self.builder().check(move || {
            runs.fetch_add(1, StdOrdering::Relaxed);
            body();
        });
    }

    /// Runs a negative control: explores `body` until an execution fails
    /// with a panic whose message contains `expected`, and re-raises that
    /// panic (so `#[should_panic(expected = ...)]` sees the property's own
    /// assertion text).
    ///
    /// A broken variant may break several properties; loom's exploration
    /// order decides which one it meets first. Executions that fail with
    /// another message *in the model's main thread* are recorded (and
    /// printed with the execution at which each was first met) and the
    /// exploration goes on. If no execution fails as expected, this panics
    /// with a message that does not contain `expected`.
    pub fn check_fails<F>(self, runs: &'static AtomicUsize, expected: &'static str, body: F)
    where
        F: Fn() + Sync + Send + 'static,
    {
        install_quiet_hook();
        let others: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
        let _report = Report::new(self, runs);
        let seen = others.clone();
        QUIET.with(|q| q.set(true));
        let _loud = Loud;
        self.builder().check(move || {
            let n = runs.fetch_add(1, StdOrdering::Relaxed) + 1;
            let Err(payload) = catch_unwind(AssertUnwindSafe(&body)) else {
                return;
            };
            let msg = panic_message(&*payload);
            if msg.contains(expected) {
                resume_unwind(payload);
            }
            // The assertion's text up to its details.
            let kind = msg.split(':').next().unwrap_or_default().to_owned();
            let mut seen = seen.lock().unwrap();
            if !seen.iter().any(|(_, k)| *k == kind) {
                println!(
                    "loom model {}: execution {n} fails with another assertion: {msg}",
                    self.name
                );
                seen.push((n, kind));
            }
        });
        panic!(
            "negative control {}: the property under test never failed; other failures \
             (execution, assertion): {:?}",
            self.name,
            others.lock().unwrap()
        );
    }
}

thread_local! {
    /// Set while a negative control explores: the panics it catches are
    /// expected and not printed.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Clears [`QUIET`] when a negative control ends, also by a panic.
struct Loud;

impl Drop for Loud {
    fn drop(&mut self) {
        QUIET.with(|q| q.set(false));
    }
}

/// Installs (once) a panic hook that stays silent on a thread exploring a
/// negative control and defers to the previous hook everywhere else. Loom
/// runs every model thread on the test's own thread, so the flag covers them.
fn install_quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        String::from("<non-string panic>")
    }
}

/// Prints a model's figures when its exploration ends.
struct Report {
    model: Model,
    runs: &'static AtomicUsize,
    start: Instant,
    cpu_start: Option<f64>,
}

impl Report {
    fn new(model: Model, runs: &'static AtomicUsize) -> Self {
        Report {
            model,
            runs,
            start: Instant::now(),
            cpu_start: thread_cpu_seconds(),
        }
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        let n = self.runs.load(StdOrdering::Relaxed);
        let outcome = if std::thread::panicking() {
            "FAILED at execution"
        } else {
            "explored"
        };
        let cpu = match (self.cpu_start, thread_cpu_seconds()) {
            (Some(a), Some(b)) => format!(" ({:.2} s CPU)", b - a),
            _ => String::new(),
        };
        println!(
            "loom model {}: {outcome} {n} interleavings, preemption bound {}, {:.2} s{cpu}",
            self.model.name,
            self.model.preemption_bound,
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// CPU time of the calling thread (Linux; loom runs a whole model on it),
/// so that figures do not depend on what else the machine runs.
fn thread_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // Fields after the command name (which may hold spaces): state is
    // field 3, utime field 14, stime field 15, in clock ticks (USER_HZ,
    // 100 on Linux).
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    //! The model index on real threads, through the registry (the shipped
    //! protocol code): a sanity check of the index itself.

    use super::*;
    use segment_registry::Registry;

    type Reg = Registry<u32, u64, ModelIndex>;

    #[test]
    fn index_serves_the_registry() {
        let reg = Reg::with_index();
        let a = reg.track(slot_addr(0), 2 * STRIDE).unwrap();
        assert!(reg.track(slot_addr(1), STRIDE).is_err(), "overlap");
        let c = reg.track(slot_addr(2), STRIDE).unwrap();
        assert_eq!(reg.segments(), vec![a, c]);
        assert_eq!(reg.find(slot_addr(1) + 5), Some(a));
        assert_eq!(reg.find(slot_addr(3)), None);
        assert_eq!(reg.find(BASE - 1), None);
        let comm = reg.attach(7);
        let report = reg
            .register_pending(comm, |_, s| Ok::<_, ()>(Some(s.seq)))
            .unwrap();
        assert_eq!(report.registered, vec![a, c]);
        let gone = reg.untrack(slot_addr(0)).unwrap();
        assert_eq!(gone.windows, vec![(comm, a.seq)]);
        assert!(gone.pass_hold.is_none());
        assert_eq!(reg.segments(), vec![c]);
        let b = reg.track(slot_addr(1), STRIDE).unwrap();
        assert_eq!(reg.segments_by_seq(), vec![c, b]);
    }
}
