//! What every model shares: the registry as the models build it, the
//! [`Ledger`] that follows windows and frees, the operations as a
//! well-behaved caller runs them (a pass that acts on its hand-backs, an
//! untrack that frees, forget, drain), and the assertions several models
//! make.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex as StdMutex;

use loom::sync::atomic::AtomicBool;
use loom::sync::Arc;

use segment_registry::{CommError, CommId, Faults, PassError, Registry, Segment, UntrackError};
use segment_registry_loom::{ModelIndex, STRIDE};

/// A window names its comm and segment, so it is unique and self-checking.
pub(crate) type Win = (CommId, Segment);
pub(crate) type Reg = Registry<u32, Win, ModelIndex>;

/// The error a test callback fails with.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Fail;

/// A registry on the model index, shared by the model's threads (see
/// [`new_registry`]).
pub(crate) fn registry(faults: Faults) -> Arc<Reg> {
    Arc::new(new_registry(faults))
}

/// Every model runs with a page granule of one grid stride, so that its
/// lookups take the page map's one-segment path (two page-map models,
/// `page_map::shared_granule_lookups_race_address_reuse` and
/// `page_map::count_survives_a_late_withdraw`, then set a granule that
/// several segments share).
pub(crate) fn new_registry(faults: Faults) -> Reg {
    if faults == Faults::NONE {
        Reg::with_index()
    } else {
        Reg::with_faults(faults)
    }
    .with_page_granule(STRIDE)
}

/// A registry whose untracks sweep as soon as the dead nodes outnumber half
/// the live ones (`with_sweep_slack(0)`), so that small models sweep.
pub(crate) fn sweeping_registry(faults: Faults) -> Arc<Reg> {
    Arc::new(new_registry(faults).with_sweep_slack(0))
}

/// After every thread joined: every node ever allocated is either retired
/// (exactly once) or still linked in the log, and the log holds at most
/// `max_in_log` nodes.
pub(crate) fn assert_nodes_accounted(reg: &Arc<Reg>, max_in_log: usize) {
    let n = reg.stats().nodes;
    if n.retired + n.in_log as u64 != n.allocated || n.in_log > max_in_log {
        // A node retired twice would be freed twice when the registry
        // drops: leak it instead, so the failure is this panic.
        std::mem::forget(reg.clone());
        panic!("a node was retired twice, leaked, or left in the log: {n:?}");
    }
}

// --------------------------------------------------------------------------
// The ledger: who got which window back, who freed which segment.
// --------------------------------------------------------------------------

#[derive(Default)]
struct LedgerState {
    /// Every window a callback returned.
    made: Vec<Win>,
    /// Every window handed back, with who handed it back.
    returned: Vec<(Win, &'static str)>,
    /// Windows registered and not yet deregistered, per segment.
    outstanding: BTreeMap<Segment, i64>,
    /// Frees per segment.
    freed: BTreeMap<Segment, u32>,
    /// Segments freed while one of their windows was still registered.
    freed_under_window: Vec<Segment>,
}

/// Bookkeeping outside the model (a `std` mutex: loom runs one thread at a
/// time, so it never blocks and adds no synchronization to the model).
#[derive(Default)]
pub(crate) struct Ledger(StdMutex<LedgerState>);

impl Ledger {
    fn with<R>(&self, f: impl FnOnce(&mut LedgerState) -> R) -> R {
        f(&mut self.0.lock().unwrap())
    }

    /// A callback registered `w`.
    pub(crate) fn made(&self, w: Win) {
        self.with(|l| {
            l.made.push(w);
            *l.outstanding.entry(w.1).or_default() += 1;
        });
    }

    /// `w` came back from `by`, which deregisters it at once.
    pub(crate) fn returned(&self, w: Win, by: &'static str) {
        self.with(|l| {
            l.returned.push((w, by));
            *l.outstanding.entry(w.1).or_default() -= 1;
        });
    }

    /// The memory of `s` is freed.
    pub(crate) fn freed(&self, s: Segment) {
        self.with(|l| {
            if l.outstanding.get(&s).copied().unwrap_or(0) != 0 {
                l.freed_under_window.push(s);
            }
            *l.freed.entry(s).or_default() += 1;
        });
    }

    /// Windows handed back by `by`.
    pub(crate) fn returned_by(&self, by: &str) -> Vec<Win> {
        self.with(|l| {
            l.returned
                .iter()
                .filter(|(_, b)| *b == by)
                .map(|(w, _)| *w)
                .collect()
        })
    }

    /// Every window made was handed back exactly once, and nothing else was.
    pub(crate) fn assert_windows_exactly_once(&self) {
        self.with(|l| {
            let mut made = l.made.clone();
            let mut back: Vec<Win> = l.returned.iter().map(|(w, _)| *w).collect();
            made.sort();
            back.sort();
            assert!(
                made == back,
                "a window was not handed back exactly once: made {:?}, handed back {:?}",
                l.made,
                l.returned
            );
        });
    }

    /// Every segment of `untracked` was freed exactly once, never while one
    /// of its windows was registered; nothing else was freed.
    pub(crate) fn assert_freed_exactly_once(&self, untracked: &BTreeSet<Segment>) {
        self.with(|l| {
            let once: BTreeSet<Segment> = l
                .freed
                .iter()
                .filter(|(_, &n)| n == 1)
                .map(|(s, _)| *s)
                .collect();
            assert!(
                &once == untracked && l.freed.values().all(|&n| n == 1),
                "memory was not freed exactly once: untracked {untracked:?}, frees {:?}",
                l.freed
            );
            assert!(
                l.freed_under_window.is_empty(),
                "memory was freed while a window was still registered: {:?}",
                l.freed_under_window
            );
        });
    }
}

// --------------------------------------------------------------------------
// Operations as a well-behaved caller runs them.
// --------------------------------------------------------------------------

/// What a pass did, once its hand-backs and frees were acted on.
pub(crate) struct PassOut {
    pub(crate) registered: Vec<Segment>,
    pub(crate) error: Option<PassError<Fail>>,
}

/// Runs a pass whose callback first calls `before(segment)` (which may fail
/// it), then registers the window `(comm, segment)`. Hand-backs are
/// deregistered, then their holds released; `free_now` is freed.
pub(crate) fn pass(
    reg: &Reg,
    comm: CommId,
    ledger: &Ledger,
    mut before: impl FnMut(&Segment) -> Result<(), Fail>,
) -> PassOut {
    let result = reg.register_pending(comm, |_, s| {
        before(s)?;
        ledger.made((comm, *s));
        Ok(Some((comm, *s)))
    });
    let (report, error) = match result {
        Ok(r) => (r, None),
        Err(f) => (f.report, Some(f.error)),
    };
    for hb in report.handed_back {
        ledger.returned(hb.window, "pass");
        if hb.hold.release() {
            ledger.freed(hb.segment);
        }
    }
    for s in report.free_now {
        ledger.freed(s);
    }
    PassOut {
        registered: report.registered,
        error,
    }
}

/// A pass whose callback never fails.
pub(crate) fn pass_ok(reg: &Reg, comm: CommId, ledger: &Ledger) -> PassOut {
    pass(reg, comm, ledger, |_| Ok(()))
}

/// Untracks `addr`: deregisters the windows, then frees the memory if no
/// pass holds it, or if releasing the pass hold says so. Returns the segment
/// and whether a pass held it.
pub(crate) fn untrack(
    reg: &Reg,
    addr: usize,
    ledger: &Ledger,
) -> Result<(Segment, bool), UntrackError> {
    let u = reg.untrack(addr)?;
    for (_, w) in u.windows {
        ledger.returned(w, "untrack");
    }
    let held = u.pass_hold.is_some();
    let free = match u.pass_hold {
        None => true,
        Some(h) => h.release(),
    };
    if free {
        ledger.freed(u.segment);
    }
    Ok((u.segment, held))
}

/// Forgets `comm`: deregisters its windows, then releases their holds.
pub(crate) fn forget(reg: &Reg, comm: CommId, ledger: &Ledger) -> Result<(), CommError> {
    let f = reg.forget(comm)?;
    for hb in f.windows {
        ledger.returned(hb.window, "forget");
        if hb.hold.release() {
            ledger.freed(hb.segment);
        }
    }
    for s in f.free_now {
        ledger.freed(s);
    }
    Ok(())
}

/// Untracks everything (after the threads joined), like an untrack each.
pub(crate) fn drain(reg: &Reg, ledger: &Ledger) -> BTreeSet<Segment> {
    let mut gone = BTreeSet::new();
    for u in reg.drain() {
        for (_, w) in u.windows {
            ledger.returned(w, "drain");
        }
        let free = match u.pass_hold {
            None => true,
            Some(h) => h.release(),
        };
        if free {
            ledger.freed(u.segment);
        }
        gone.insert(u.segment);
    }
    gone
}

pub(crate) fn assert_seq_increasing(registered: &[Segment]) {
    assert!(
        registered.windows(2).all(|w| w[0].seq < w[1].seq),
        "a pass registered out of seq order: {registered:?}"
    );
}

pub(crate) fn assert_no_duplicates<'a>(passes: impl IntoIterator<Item = &'a [Segment]>) {
    let mut seen = BTreeSet::new();
    for p in passes {
        for s in p {
            assert!(
                seen.insert(*s),
                "a segment was registered twice with one comm: {s:?}"
            );
        }
    }
}

pub(crate) fn faults(f: impl FnOnce(&mut Faults)) -> Faults {
    let mut x = Faults::NONE;
    f(&mut x);
    x
}

/// A loom flag: Release when set, Acquire when read, so that reading `true`
/// means the setter's earlier steps happened before the reader's later ones.
pub(crate) fn flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

/// Checks what a reader saw: every segment is one that was tracked, whole
/// (never torn), `find(x)` contains `x`, the orders hold, `keep` (never
/// untracked) is always seen, and `gone` is not seen once its untrack
/// happened before the read.
pub(crate) fn check_reads(
    reg: &Reg,
    tracked: &[Segment],
    keep: Segment,
    gone: Segment,
    gone_before: bool,
    probes: &[usize],
) {
    let whole = |s: &Segment| {
        assert!(tracked.contains(s), "a reader saw a torn segment: {s:?}");
    };
    for &x in probes {
        if let Some(s) = reg.find(x) {
            whole(&s);
            assert!(s.contains(x), "find({x:#x}) returned {s:?}");
            assert!(
                !(gone_before && s == gone),
                "find returned a segment untracked before it began"
            );
        } else {
            assert!(!keep.contains(x), "find missed a live segment at {x:#x}");
        }
    }
    let by_addr = reg.segments();
    let by_seq = reg.segments_by_seq();
    for (v, what) in [(&by_addr, "segments"), (&by_seq, "segments_by_seq")] {
        v.iter().for_each(whole);
        assert!(v.contains(&keep), "{what} missed a live segment");
        assert!(
            !(gone_before && v.contains(&gone)),
            "{what} returned a segment untracked before it began"
        );
    }
    assert!(by_addr.windows(2).all(|w| w[0].addr < w[1].addr));
    assert!(by_seq.windows(2).all(|w| w[0].seq < w[1].seq));
}
