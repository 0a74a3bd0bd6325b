//! The loom models of the registry protocol (DESIGN.md §11), one `#[test]`
//! per model, and the negative controls: the same model code run on a
//! registry built with a deliberately broken variant (`Faults`, chosen at
//! run time), each expected to fail with the text of the property's own
//! assertion.
//!
//! Every model runs the shipped protocol code on the loom model index
//! ([`ModelIndex`]). Windows are `(comm, segment)` pairs, so each one names
//! itself; a [`Ledger`] follows every window from the callback that made it
//! to the party that hands it back, and every untracked segment's memory to
//! the party that frees it.
//!
//! Two kinds of observation are used, on purpose:
//! * "happened before" is what loom's memory model allows a caller to rely
//!   on: it is established by the models' own loom Release/Acquire flags
//!   (e.g. "this track returned before the pass began");
//! * the [`Ledger`]'s `std` bookkeeping sees the order in which loom ran the
//!   steps. It is used only where the protocol decides by read-modify-write
//!   operations on one word (holds, claims), which loom performs in that
//!   order.
#![cfg(feature = "loom")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool as StdAtomicBool, AtomicUsize, Ordering as StdOrdering};
use std::sync::Mutex as StdMutex;

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use loom::thread;

use segment_registry::{
    CommError, CommId, Faults, PassError, Registry, Segment, TrackError, UntrackError,
};
use segment_registry_loom::{slot_addr, Model, ModelIndex, STRIDE};

/// A window names its comm and segment, so it is unique and self-checking.
type Win = (CommId, Segment);
type Reg = Registry<u32, Win, ModelIndex>;

/// The error a test callback fails with.
#[derive(Debug, PartialEq, Eq)]
struct Fail;

fn registry(faults: Faults) -> Arc<Reg> {
    Arc::new(new_registry(faults))
}

/// Every model runs with a page granule of one grid stride, so that its
/// lookups take the page map's one-segment path (model 9 also runs a
/// granule shared by several segments).
fn new_registry(faults: Faults) -> Reg {
    if faults == Faults::NONE {
        Reg::with_index()
    } else {
        Reg::with_faults(faults)
    }
    .with_page_granule(STRIDE)
}

/// A registry whose untracks sweep as soon as the dead nodes outnumber half
/// the live ones (`with_sweep_slack(0)`), so that small models sweep.
fn sweeping_registry(faults: Faults) -> Arc<Reg> {
    Arc::new(new_registry(faults).with_sweep_slack(0))
}

/// After every thread joined: every node ever allocated is either retired
/// (exactly once) or still linked in the log, and the log holds at most
/// `max_in_log` nodes.
fn assert_nodes_accounted(reg: &Arc<Reg>, max_in_log: usize) {
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
struct Ledger(StdMutex<LedgerState>);

impl Ledger {
    fn with<R>(&self, f: impl FnOnce(&mut LedgerState) -> R) -> R {
        f(&mut self.0.lock().unwrap())
    }

    /// A callback registered `w`.
    fn made(&self, w: Win) {
        self.with(|l| {
            l.made.push(w);
            *l.outstanding.entry(w.1).or_default() += 1;
        });
    }

    /// `w` came back from `by`, which deregisters it at once.
    fn returned(&self, w: Win, by: &'static str) {
        self.with(|l| {
            l.returned.push((w, by));
            *l.outstanding.entry(w.1).or_default() -= 1;
        });
    }

    /// The memory of `s` is freed.
    fn freed(&self, s: Segment) {
        self.with(|l| {
            if l.outstanding.get(&s).copied().unwrap_or(0) != 0 {
                l.freed_under_window.push(s);
            }
            *l.freed.entry(s).or_default() += 1;
        });
    }

    /// Windows handed back by `by`.
    fn returned_by(&self, by: &str) -> Vec<Win> {
        self.with(|l| {
            l.returned
                .iter()
                .filter(|(_, b)| *b == by)
                .map(|(w, _)| *w)
                .collect()
        })
    }

    /// Every window made was handed back exactly once, and nothing else was.
    fn assert_windows_exactly_once(&self) {
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
    fn assert_freed_exactly_once(&self, untracked: &BTreeSet<Segment>) {
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
struct PassOut {
    registered: Vec<Segment>,
    error: Option<PassError<Fail>>,
}

/// Runs a pass whose callback first calls `before(segment)` (which may fail
/// it), then registers the window `(comm, segment)`. Hand-backs are
/// deregistered, then their holds released; `free_now` is freed.
fn pass(
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
fn pass_ok(reg: &Reg, comm: CommId, ledger: &Ledger) -> PassOut {
    pass(reg, comm, ledger, |_| Ok(()))
}

/// Untracks `addr`: deregisters the windows, then frees the memory if no
/// pass holds it, or if releasing the pass hold says so. Returns the segment
/// and whether a pass held it.
fn untrack(reg: &Reg, addr: usize, ledger: &Ledger) -> Result<(Segment, bool), UntrackError> {
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
fn forget(reg: &Reg, comm: CommId, ledger: &Ledger) -> Result<(), CommError> {
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
fn drain(reg: &Reg, ledger: &Ledger) -> BTreeSet<Segment> {
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

fn assert_seq_increasing(registered: &[Segment]) {
    assert!(
        registered.windows(2).all(|w| w[0].seq < w[1].seq),
        "a pass registered out of seq order: {registered:?}"
    );
}

fn assert_no_duplicates<'a>(passes: impl IntoIterator<Item = &'a [Segment]>) {
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

fn faults(f: impl FnOnce(&mut Faults)) -> Faults {
    let mut x = Faults::NONE;
    f(&mut x);
    x
}

/// A loom flag: Release when set, Acquire when read, so that reading `true`
/// means the setter's earlier steps happened before the reader's later ones.
fn flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

// --------------------------------------------------------------------------
// Model 1: two tracks racing a registration pass.
// --------------------------------------------------------------------------

/// Two threads track a segment each while the main thread runs a pass for
/// one comm; after both joined, a second pass runs.
///
/// * no segment is registered twice;
/// * every tracked segment is registered by one of the two passes;
/// * each pass goes in increasing seq;
/// * the first pass registers every segment whose track returned before it
///   began, and none whose track began after its set was fixed (observed
///   by a track that saw the pass already inside a callback);
/// * the first pass registers exactly a seq prefix 1..=k (never past an
///   unpublished seq), the second exactly k+1..=n;
/// * every window comes back exactly once (drain), every segment is freed
///   exactly once.
fn tracks_race_pass(faults: Faults) {
    let reg = registry(faults);
    let ledger = Arc::new(Ledger::default());
    let comm = reg.attach(1);
    let in_callback = flag();
    let done = [flag(), flag()];
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let (reg, in_callback, done) = (reg.clone(), in_callback.clone(), done[i].clone());
            thread::spawn(move || {
                // Acquire: `true` means a callback had begun, so the pass's
                // set was fixed before this track began.
                let after_pass_began = in_callback.load(Ordering::Acquire);
                let s = reg
                    .track(slot_addr(i), STRIDE)
                    .expect("disjoint tracks succeed");
                // Release: the track returned before whoever reads `true`.
                done.store(true, Ordering::Release);
                (s, after_pass_began)
            })
        })
        .collect();

    let returned_before: Vec<bool> = done.iter().map(|d| d.load(Ordering::Acquire)).collect();
    let mut signalled = false;
    let first = pass(&reg, comm, &ledger, |_| {
        if !signalled {
            signalled = true;
            // Release: everything the pass did so far (its set is fixed)
            // happens before a track that reads `true`.
            in_callback.store(true, Ordering::Release);
        }
        Ok(())
    });
    let tracked: Vec<(Segment, bool)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let second = pass_ok(&reg, comm, &ledger);
    assert!(first.error.is_none() && second.error.is_none());

    let (first, second) = (first.registered, second.registered);
    assert_no_duplicates([&first[..], &second[..]]);
    let all: BTreeSet<Segment> = tracked.iter().map(|(s, _)| *s).collect();
    let union: BTreeSet<Segment> = first.iter().chain(&second).copied().collect();
    assert!(
        union == all,
        "a tracked segment was never registered: tracked {all:?}, passes {first:?} then {second:?}"
    );
    assert_seq_increasing(&first);
    assert_seq_increasing(&second);
    for (i, (s, after_pass_began)) in tracked.iter().enumerate() {
        assert!(
            !returned_before[i] || first.contains(s),
            "the pass missed a segment whose track returned before it began: {s:?}, pass {first:?}"
        );
        assert!(
            !after_pass_began || !first.contains(s),
            "the pass registered a segment whose track began after its set was fixed: {s:?}"
        );
    }
    let seqs = |v: &[Segment]| v.iter().map(|s| s.seq).collect::<Vec<_>>();
    let k = first.len() as u64;
    assert!(
        seqs(&first) == (1..=k).collect::<Vec<_>>()
            && seqs(&second) == (k + 1..=all.len() as u64).collect::<Vec<_>>(),
        "a pass registered past an unpublished seq: {first:?} then {second:?}"
    );

    let gone = drain(&reg, &ledger);
    ledger.assert_windows_exactly_once();
    ledger.assert_freed_exactly_once(&gone);
}

static RUNS_1: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model1_tracks_race_a_pass() {
    Model::new("1 tracks race a pass", 3).check(&RUNS_1, || tracks_race_pass(Faults::NONE));
}

static RUNS_1_NAIVE: AtomicUsize = AtomicUsize::new(0);
#[test]
#[should_panic(expected = "a tracked segment was never registered")]
fn model1_negative_naive_cursor_misses_a_segment() {
    let f = faults(|f| f.naive_cursor = true);
    Model::new("1- naive cursor", 3).check_fails(
        &RUNS_1_NAIVE,
        "a tracked segment was never registered",
        move || tracks_race_pass(f),
    );
}

// --------------------------------------------------------------------------
// Model 2: untrack racing a pass that holds the same segment.
// --------------------------------------------------------------------------

/// A and B are tracked (in that order); `untrackers` threads untrack A
/// (and B) while the main thread runs a pass. The pass keeps A's hold until
/// B is done, so the hold hand-over inside a pass is in the race too.
///
/// For each untracked segment S:
/// * if the untrack reports a pass hold, the pass registered S;
/// * if the pass handed S's window back, the untrack reported a pass hold;
/// * if S's callback began after S's untrack returned (S was held: it was
///   live when the pass took its set), the untrack reported the hold; if
///   the untrack began after the pass returned, it reported none.
///
/// And: every window comes back exactly once (untrack, hand-back, or drain
/// for a segment left tracked), every untracked segment's memory is freed
/// exactly once and never while one of its windows is registered.
///
/// With `sweep`, C and D are tracked after B (so that A and B are not among
/// the last two log nodes) and the registry sweeps at once (slack 0): the
/// second untrack sweeps while the pass may still hold A or B, and the hold
/// releases make them sweepable later; after a drain the log holds two
/// nodes and every other node was retired exactly once.
fn untrack_races_pass(faults: Faults, untrackers: usize, sweep: bool) {
    let reg = if sweep {
        sweeping_registry(faults)
    } else {
        registry(faults)
    };
    let ledger = Arc::new(Ledger::default());
    let n = if sweep { 4 } else { 2 };
    let segs: Vec<Segment> = (0..n)
        .map(|i| reg.track(slot_addr(i), STRIDE).unwrap())
        .collect();
    let comm = reg.attach(1);
    // Schedule-order observations (see the file's docs): the protocol
    // decides these races by RMWs on each segment's state word.
    let untrack_returned: std::sync::Arc<[StdAtomicBool; 4]> = std::sync::Arc::default();
    let pass_returned = std::sync::Arc::new(StdAtomicBool::new(false));

    let handles: Vec<_> = (0..untrackers)
        .map(|i| {
            let (reg, ledger) = (reg.clone(), ledger.clone());
            let (untrack_returned, pass_returned) =
                (untrack_returned.clone(), pass_returned.clone());
            let seg = segs[i];
            thread::spawn(move || {
                let after_pass = pass_returned.load(StdOrdering::SeqCst);
                let (s, held) = untrack(&reg, seg.addr, &ledger).expect("S is tracked");
                untrack_returned[i].store(true, StdOrdering::SeqCst);
                assert_eq!(s, seg);
                (held, after_pass)
            })
        })
        .collect();
    let mut callback_after_untrack = [false; 4];
    let out = pass(&reg, comm, &ledger, |s| {
        let i = segs.iter().position(|x| x == s).expect("a tracked segment");
        callback_after_untrack[i] = untrack_returned[i].load(StdOrdering::SeqCst);
        Ok(())
    });
    pass_returned.store(true, StdOrdering::SeqCst);
    let untracked: Vec<(bool, bool)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(out.error.is_none());
    let gone: BTreeSet<Segment> = segs[..untrackers].iter().copied().collect();
    let drained = drain(&reg, &ledger);

    // Ordered so that a lost window reports as such.
    ledger.assert_windows_exactly_once();
    let handed_back = ledger.returned_by("pass");
    for (i, &(held, untrack_after_pass)) in untracked.iter().enumerate() {
        let s = segs[i];
        assert!(
            !held || out.registered.contains(&s),
            "untrack reported a pass hold but the pass did not register the segment"
        );
        assert!(
            !handed_back.iter().any(|w| w.1 == s) || held,
            "the pass handed the window back but untrack reported no pass hold"
        );
        assert!(
            !callback_after_untrack[i] || held,
            "untrack did not report the hold of a pass that held the segment"
        );
        assert!(
            !untrack_after_pass || !held,
            "untrack reported a pass hold after the pass let go"
        );
    }
    for s in &segs[untrackers..] {
        assert!(
            out.registered.contains(s),
            "the pass missed a segment tracked before it began"
        );
    }
    ledger.assert_freed_exactly_once(&gone.union(&drained).copied().collect());
    if sweep {
        assert!(reg.stats().nodes.sweeps >= 1, "no untrack swept");
        assert_nodes_accounted(&reg, 2);
    }
}

static RUNS_2: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model2_untrack_races_a_pass_holding_the_segment() {
    Model::new("2 untracks race a holding pass", 3)
        .check(&RUNS_2, || untrack_races_pass(Faults::NONE, 2, false));
}

static RUNS_2S: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model2_untracks_race_a_holding_pass_with_sweeps() {
    Model::new("2s untracks + sweeps race a holding pass", 3)
        .check(&RUNS_2S, || untrack_races_pass(Faults::NONE, 2, true));
}

static RUNS_2_UNCHECKED: AtomicUsize = AtomicUsize::new(0);
#[test]
#[should_panic(expected = "a window was not handed back exactly once")]
fn model2_negative_unchecked_window_add_loses_the_window() {
    let f = faults(|f| f.unchecked_window_add = true);
    Model::new("2- unchecked window add", 3).check_fails(
        &RUNS_2_UNCHECKED,
        "a window was not handed back exactly once",
        move || untrack_races_pass(f, 1, false),
    );
}

// --------------------------------------------------------------------------
// Model 3: two passes for the same comm.
// --------------------------------------------------------------------------

/// A and B are tracked; two threads run a pass for the same comm while a
/// third tracks C; after all three, a last pass runs. No segment is
/// registered twice; a pass fails, if at all, with `Busy`; each pass goes in
/// seq order; together the passes register A, B and C; every window comes
/// back exactly once.
fn two_passes_one_comm() {
    let reg = registry(Faults::NONE);
    let ledger = Arc::new(Ledger::default());
    let a = reg.track(slot_addr(0), STRIDE).unwrap();
    let b = reg.track(slot_addr(1), STRIDE).unwrap();
    let comm = reg.attach(1);
    let h = {
        let (reg, ledger) = (reg.clone(), ledger.clone());
        thread::spawn(move || {
            let o = pass_ok(&reg, comm, &ledger);
            (o.registered, o.error)
        })
    };
    let ht = {
        let reg = reg.clone();
        thread::spawn(move || reg.track(slot_addr(2), STRIDE).expect("disjoint"))
    };
    let mine = pass_ok(&reg, comm, &ledger);
    let (theirs, their_error) = h.join().unwrap();
    let c = ht.join().unwrap();
    let last = pass_ok(&reg, comm, &ledger);

    for e in [&mine.error, &their_error, &last.error]
        .into_iter()
        .flatten()
    {
        assert!(
            matches!(e, PassError::Comm(CommError::Busy(c)) if *c == comm),
            "a racing pass failed with something other than Busy: {e:?}"
        );
    }
    assert!(last.error.is_none(), "a pass after the race was refused");
    assert_no_duplicates([&mine.registered[..], &theirs[..], &last.registered[..]]);
    for p in [&mine.registered, &theirs, &last.registered] {
        assert_seq_increasing(p);
    }
    let union: BTreeSet<Segment> = mine
        .registered
        .iter()
        .chain(&theirs)
        .chain(&last.registered)
        .copied()
        .collect();
    assert_eq!(
        union,
        BTreeSet::from([a, b, c]),
        "a segment was never registered"
    );
    let gone = drain(&reg, &ledger);
    ledger.assert_windows_exactly_once();
    ledger.assert_freed_exactly_once(&gone);
}

static RUNS_3: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model3_two_passes_for_one_comm() {
    Model::new("3 two passes, one comm", 3).check(&RUNS_3, two_passes_one_comm);
}

// --------------------------------------------------------------------------
// Model 4: forget racing a pass for the same comm.
// --------------------------------------------------------------------------

/// A and B are tracked; one thread forgets the comm while the main thread
/// runs a pass for it (and, with `untrack_a`, a third thread untracks A);
/// then everything is drained.
///
/// * the pass ends with success, `Forgotten`, or `NotAttached`;
/// * every window the pass made comes back exactly once (forget, the pass's
///   hand-backs, untrack, or drain), and none of the forgotten comm's
///   windows is left for drain: forget and the pass return them all before
///   the comm goes;
/// * every segment's memory is freed exactly once, never while one of its
///   windows is registered (forget's hand-backs hold the segment against a
///   racing untrack until their window is deregistered).
fn forget_races_pass(untrack_a: bool) {
    let reg = registry(Faults::NONE);
    let ledger = Arc::new(Ledger::default());
    let a = reg.track(slot_addr(0), STRIDE).unwrap();
    reg.track(slot_addr(1), STRIDE).unwrap();
    let comm = reg.attach(1);
    let h = {
        let (reg, ledger) = (reg.clone(), ledger.clone());
        thread::spawn(move || forget(&reg, comm, &ledger))
    };
    let hu = untrack_a.then(|| {
        let (reg, ledger) = (reg.clone(), ledger.clone());
        thread::spawn(move || untrack(&reg, a.addr, &ledger).expect("A is tracked"))
    });
    let out = pass_ok(&reg, comm, &ledger);
    h.join().unwrap().expect("the comm was attached");
    let mut gone: BTreeSet<Segment> = hu.map(|h| h.join().unwrap().0).into_iter().collect();

    if let Some(e) = &out.error {
        assert!(
            matches!(e, PassError::Forgotten(c) | PassError::Comm(CommError::NotAttached(c)) if *c == comm),
            "a pass racing forget failed with {e:?}"
        );
    }
    assert_seq_increasing(&out.registered);
    gone.extend(drain(&reg, &ledger));
    ledger.assert_windows_exactly_once();
    assert!(
        ledger.returned_by("drain").is_empty(),
        "a window of the forgotten comm was left behind: {:?}",
        ledger.returned_by("drain")
    );
    ledger.assert_freed_exactly_once(&gone);
    assert!(
        matches!(reg.forget(comm), Err(CommError::NotAttached(_))),
        "forgot a comm twice"
    );
}

static RUNS_4: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model4_forget_races_a_pass() {
    Model::new("4 forget races a pass", 3).check(&RUNS_4, || forget_races_pass(false));
}

static RUNS_4U: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model4_forget_races_a_pass_and_an_untrack() {
    Model::new("4u forget races a pass and an untrack", 3)
        .check(&RUNS_4U, || forget_races_pass(true));
}

// --------------------------------------------------------------------------
// Model 5: lookup and iteration racing untrack (and the sweep).
// --------------------------------------------------------------------------

/// Checks what a reader saw: every segment is one that was tracked, whole
/// (never torn), `find(x)` contains `x`, the orders hold, `keep` (never
/// untracked) is always seen, and `gone` is not seen once its untrack
/// happened before the read.
fn check_reads(
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

/// A and B are tracked; one thread untracks A while the main thread looks
/// up and iterates (no sweep: see the sweep variant below).
fn readers_race_untrack() {
    let reg = registry(Faults::NONE);
    let ledger = Arc::new(Ledger::default());
    let a = reg.track(slot_addr(0), STRIDE).unwrap();
    let b = reg.track(slot_addr(1), 2 * STRIDE).unwrap();
    let untracked = flag();
    let h = {
        let (reg, ledger, untracked) = (reg.clone(), ledger.clone(), untracked.clone());
        thread::spawn(move || {
            untrack(&reg, a.addr, &ledger).expect("A is tracked");
            untracked.store(true, Ordering::Release);
        })
    };
    let gone_before = untracked.load(Ordering::Acquire);
    check_reads(
        &reg,
        &[a, b],
        b,
        a,
        gone_before,
        &[a.addr + 1, b.addr + STRIDE],
    );
    h.join().unwrap();
    assert_eq!(reg.segments(), vec![b]);
    ledger.assert_freed_exactly_once(&BTreeSet::from([a]));
}

static RUNS_5: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model5_readers_race_untrack() {
    Model::new("5 readers race untrack", 3).check(&RUNS_5, readers_race_untrack);
}

/// P, Q, R, S are tracked (P seq 1 … S seq 4) and P untracked, so the log is
/// `P† Q R S`. One thread untracks Q, which sweeps (slack 0: 2 dead > 2/2
/// live) and unlinks P and Q — everything but the last two nodes — while
/// the main thread looks up and iterates.
///
/// * no node is touched after epoch reclamation could have freed it (the
///   model reclaimer panics);
/// * readers see only whole tracked segments, R and S always, Q never once
///   its untrack happened before the read (`check_reads`);
/// * after the join, the log is `R S` and every other node was retired
///   exactly once.
fn readers_race_untrack_and_sweep(faults: Faults) {
    let reg = sweeping_registry(faults);
    let ledger = Arc::new(Ledger::default());
    let [p, q, r, s] = [0, 1, 2, 3].map(|i| reg.track(slot_addr(i), STRIDE).unwrap());
    untrack(&reg, p.addr, &ledger).unwrap();
    assert_eq!(reg.stats().nodes.sweeps, 0, "the set-up swept");
    let untracked = flag();
    let h = {
        let (reg, ledger, untracked) = (reg.clone(), ledger.clone(), untracked.clone());
        thread::spawn(move || {
            untrack(&reg, q.addr, &ledger).expect("Q is tracked");
            untracked.store(true, Ordering::Release);
        })
    };
    let gone_before = untracked.load(Ordering::Acquire);
    check_reads(&reg, &[q, r, s], r, q, gone_before, &[q.addr + 1, r.addr]);
    h.join().unwrap();
    assert_eq!(reg.segments_by_seq(), vec![r, s]);
    assert_eq!(
        reg.stats().nodes.sweeps,
        1,
        "the racing untrack did not sweep"
    );
    assert_nodes_accounted(&reg, 2);
    ledger.assert_freed_exactly_once(&BTreeSet::from([p, q]));
}

static RUNS_5S: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model5_readers_race_untrack_and_sweep() {
    Model::new("5s readers race untrack + sweep", 3)
        .check(&RUNS_5S, || readers_race_untrack_and_sweep(Faults::NONE));
}

static RUNS_5S_NODEFER: AtomicUsize = AtomicUsize::new(0);
#[test]
#[should_panic(expected = "access to a reclaimed node (model reclaimer)")]
fn model5_negative_free_without_defer_touches_a_reclaimed_node() {
    let f = faults(|f| f.free_without_defer = true);
    Model::new("5s- free without defer", 3).check_fails(
        &RUNS_5S_NODEFER,
        "access to a reclaimed node (model reclaimer)",
        move || readers_race_untrack_and_sweep(f),
    );
}

/// Concurrent sweeps (Harris marks): P, Q, R, S are tracked and P
/// untracked (log `P† Q R S`). Two threads untrack Q and R, and both sweep
/// (each sees more dead than half the live), racing to unlink P and Q —
/// where one may claim Q while the other is unlinking Q's predecessor P.
/// Meanwhile the main thread iterates the log and tracks E at P's old
/// address, an append at the tail that the sweeps must not lose.
///
/// * no reclaimed node is touched; E is appended and visible;
/// * after the join the log is `… S E`, and once everything is drained
///   (whose untracks sweep again, finishing any swing that failed) the log
///   holds two nodes and every other node was retired exactly once.
fn concurrent_sweeps_race_a_reader_and_an_append() {
    let reg = sweeping_registry(Faults::NONE);
    let ledger = Arc::new(Ledger::default());
    let [p, q, r, s] = [0, 1, 2, 3].map(|i| reg.track(slot_addr(i), STRIDE).unwrap());
    untrack(&reg, p.addr, &ledger).unwrap();
    let handles: Vec<_> = [q, r]
        .into_iter()
        .map(|x| {
            let (reg, ledger) = (reg.clone(), ledger.clone());
            thread::spawn(move || untrack(&reg, x.addr, &ledger).expect("tracked").0)
        })
        .collect();
    let seen = reg.segments_by_seq();
    let e = reg.track(p.addr, STRIDE).expect("P's range is free");
    for x in &seen {
        assert!([q, r, s].contains(x), "a reader saw a torn segment: {x:?}");
    }
    assert!(seen.contains(&s), "segments_by_seq missed a live segment");
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(reg.segments_by_seq(), vec![s, e], "an append was lost");
    assert!(reg.stats().nodes.sweeps >= 1, "no untrack swept");
    let mut gone = BTreeSet::from([p, q, r]);
    gone.extend(drain(&reg, &ledger));
    assert_nodes_accounted(&reg, 2);
    ledger.assert_freed_exactly_once(&gone);
}

static RUNS_5C: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model5_concurrent_sweeps_race_a_reader_and_an_append() {
    Model::new("5c two sweeps race a reader + append", 3)
        .check(&RUNS_5C, concurrent_sweeps_race_a_reader_and_an_append);
}

/// The sweep against a pass: A and B are tracked and registered (the
/// watermark pins B); C, D are tracked, C untracked, and E tracked at C's
/// old address, so the log is `A B C† D E`. One thread untracks B — the
/// pinned watermark node — and sweeps (unlinking C, never the pinned B),
/// while the main thread runs the next pass, which walks over C.
///
/// * the pass registers exactly D and E; no reclaimed node is touched;
/// * every window comes back exactly once; after a drain the log holds two
///   nodes and every other node was retired exactly once.
fn pass_races_untrack_and_sweep() {
    let reg = sweeping_registry(Faults::NONE);
    let ledger = Arc::new(Ledger::default());
    let comm = reg.attach(1);
    let a = reg.track(slot_addr(0), STRIDE).unwrap();
    let b = reg.track(slot_addr(1), STRIDE).unwrap();
    assert_eq!(pass_ok(&reg, comm, &ledger).registered, vec![a, b]);
    let c = reg.track(slot_addr(2), STRIDE).unwrap();
    let d = reg.track(slot_addr(3), STRIDE).unwrap();
    untrack(&reg, c.addr, &ledger).unwrap();
    let e = reg.track(slot_addr(2), STRIDE).unwrap();
    assert_eq!(reg.stats().nodes.sweeps, 0, "the set-up swept");
    let h = {
        let (reg, ledger) = (reg.clone(), ledger.clone());
        thread::spawn(move || untrack(&reg, b.addr, &ledger).expect("B is tracked"))
    };
    let out = pass_ok(&reg, comm, &ledger);
    let (_, held) = h.join().unwrap();
    assert!(!held, "B was held by no pass");
    assert!(out.error.is_none());
    assert_eq!(
        out.registered,
        vec![d, e],
        "the pass registered the wrong set"
    );
    assert_eq!(
        reg.stats().nodes.sweeps,
        1,
        "the racing untrack did not sweep"
    );
    assert_eq!(reg.segments_by_seq(), vec![a, d, e]);
    let mut gone = BTreeSet::from([b, c]);
    gone.extend(drain(&reg, &ledger));
    assert_nodes_accounted(&reg, 2);
    ledger.assert_windows_exactly_once();
    ledger.assert_freed_exactly_once(&gone);
}

static RUNS_5P: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model5_pass_races_untrack_and_sweep() {
    Model::new("5p pass races untrack + sweep", 3).check(&RUNS_5P, pass_races_untrack_and_sweep);
}

// --------------------------------------------------------------------------
// Model 6: a callback failure mid-pass racing a track.
// --------------------------------------------------------------------------

/// A and B are tracked; one thread tracks C while the main thread runs a
/// pass whose callback fails on B, then retries; after the join a last pass
/// runs. The failed pass registered exactly A and reports B; the retry
/// starts at B; no duplicate, no miss, seq order in each pass; every window
/// comes back exactly once.
fn failure_races_track() {
    let reg = registry(Faults::NONE);
    let ledger = Arc::new(Ledger::default());
    let a = reg.track(slot_addr(0), STRIDE).unwrap();
    let b = reg.track(slot_addr(1), STRIDE).unwrap();
    let comm = reg.attach(1);
    let h = {
        let reg = reg.clone();
        thread::spawn(move || reg.track(slot_addr(2), STRIDE).expect("disjoint"))
    };
    let failed = pass(&reg, comm, &ledger, |s| {
        if *s == b {
            Err(Fail)
        } else {
            Ok(())
        }
    });
    let retry = pass_ok(&reg, comm, &ledger);
    let c = h.join().unwrap();
    let last = pass_ok(&reg, comm, &ledger);

    assert!(
        matches!(&failed.error, Some(PassError::Callback { segment, error: Fail }) if *segment == b),
        "the pass did not stop at the failing segment: {:?}",
        failed.error
    );
    assert_eq!(
        failed.registered,
        vec![a],
        "the failed pass lost its prefix"
    );
    assert!(retry.error.is_none() && last.error.is_none());
    assert_eq!(
        retry.registered.first(),
        Some(&b),
        "the retry did not resume at the failed segment"
    );
    let passes = [
        &failed.registered[..],
        &retry.registered[..],
        &last.registered[..],
    ];
    assert_no_duplicates(passes);
    passes.iter().for_each(|p| assert_seq_increasing(p));
    let union: BTreeSet<Segment> = passes.iter().flat_map(|p| p.iter().copied()).collect();
    assert_eq!(
        union,
        BTreeSet::from([a, b, c]),
        "a segment was never registered"
    );
    let gone = drain(&reg, &ledger);
    ledger.assert_windows_exactly_once();
    ledger.assert_freed_exactly_once(&gone);
}

static RUNS_6: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model6_callback_failure_races_a_track() {
    Model::new("6 callback failure races a track", 3).check(&RUNS_6, failure_races_track);
}

// --------------------------------------------------------------------------
// Model 7: overlap.
// --------------------------------------------------------------------------

/// Two threads track overlapping ranges that start at different addresses
/// (slots 0 and 1, two strides long each) while the main thread runs a pass.
///
/// * at most one of the two tracks succeeds (and, as nothing else is in the
///   way, exactly one);
/// * a rejected range never reaches a pass: the racing pass and a pass after
///   the join together register exactly the winner;
/// * lookups and iteration show exactly the winner.
fn overlapping_tracks(faults: Faults) {
    let reg = registry(faults);
    let ledger = Arc::new(Ledger::default());
    let comm = reg.attach(1);
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let reg = reg.clone();
            thread::spawn(move || reg.track(slot_addr(i), 2 * STRIDE))
        })
        .collect();
    let racing = pass_ok(&reg, comm, &ledger);
    let results: Vec<Result<Segment, TrackError>> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    let live: Vec<Segment> = results.iter().filter_map(|r| r.clone().ok()).collect();
    assert!(
        live.len() <= 1,
        "both overlapping tracks are live: {live:?}"
    );
    assert_eq!(live.len(), 1, "both overlapping tracks were rejected");
    for r in &results {
        if let Err(e) = r {
            assert!(matches!(e, TrackError::Overlap { .. }), "{e:?}");
        }
    }
    let after = pass_ok(&reg, comm, &ledger);
    let mut registered = racing.registered.clone();
    registered.extend(&after.registered);
    assert_eq!(registered, live, "a rejected segment reached a pass");
    assert_eq!(reg.segments(), live);
    assert_eq!(reg.segments_by_seq(), live);
    assert_eq!(reg.find(slot_addr(1)), live.first().copied());
    let gone = drain(&reg, &ledger);
    ledger.assert_windows_exactly_once();
    ledger.assert_freed_exactly_once(&gone);
}

static RUNS_7: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model7_overlapping_tracks_race() {
    Model::new("7 overlapping tracks race", 3).check(&RUNS_7, || overlapping_tracks(Faults::NONE));
}

static RUNS_7_NOFENCE: AtomicUsize = AtomicUsize::new(0);
#[test]
#[should_panic(expected = "both overlapping tracks are live")]
fn model7_negative_skip_overlap_fence_lets_both_live() {
    let f = faults(|f| f.skip_overlap_fence = true);
    Model::new("7- no overlap fence", 3).check_fails(
        &RUNS_7_NOFENCE,
        "both overlapping tracks are live",
        move || overlapping_tracks(f),
    );
}

/// A = [slot 0, +2 strides) is tracked; one thread untracks A while another
/// tracks B = [slot 1, +2 strides), which overlaps it.
///
/// * if B's track succeeds, A is already dead for it: B's own thread no
///   longer finds A (never both live);
/// * if A's untrack returned before B's track began, B is accepted;
/// * a pass after the join registers exactly the live set.
fn track_races_untrack_of_overlapped() {
    let reg = registry(Faults::NONE);
    let ledger = Arc::new(Ledger::default());
    let a = reg.track(slot_addr(0), 2 * STRIDE).unwrap();
    let comm = reg.attach(1);
    let untracked = flag();
    let hu = {
        let (reg, ledger, untracked) = (reg.clone(), ledger.clone(), untracked.clone());
        thread::spawn(move || {
            untrack(&reg, a.addr, &ledger).expect("A is tracked");
            untracked.store(true, Ordering::Release);
        })
    };
    let ht = {
        let (reg, untracked) = (reg.clone(), untracked.clone());
        thread::spawn(move || {
            let a_gone = untracked.load(Ordering::Acquire);
            let r = reg.track(slot_addr(1), 2 * STRIDE);
            if r.is_ok() {
                assert!(
                    reg.find(a.addr) != Some(a),
                    "both overlapping ranges are live"
                );
            }
            (r, a_gone)
        })
    };
    hu.join().unwrap();
    let (r, a_gone) = ht.join().unwrap();
    assert!(
        !a_gone || r.is_ok(),
        "a track was rejected by a segment untracked before it began: {r:?}"
    );
    let live: Vec<Segment> = r.iter().copied().collect();
    assert_eq!(reg.segments(), live);
    let out = pass_ok(&reg, comm, &ledger);
    assert_eq!(out.registered, live, "a rejected segment reached a pass");
    let mut gone = drain(&reg, &ledger);
    gone.insert(a);
    ledger.assert_windows_exactly_once();
    ledger.assert_freed_exactly_once(&gone);
}

static RUNS_7U: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model7_track_races_untrack_of_the_overlapped_segment() {
    Model::new("7u track races untrack of overlapped", 3)
        .check(&RUNS_7U, track_races_untrack_of_overlapped);
}

// --------------------------------------------------------------------------
// Model 8: the window lookup racing forget and untrack (issue 9).
// --------------------------------------------------------------------------

/// A and B are registered with one comm. One thread forgets the comm, one
/// untracks A, while the main thread looks up the windows of B and A:
///
/// * a lookup that begins after forget (or untrack) has handed the window
///   back never returns it;
/// * a window it does return is that segment's, at the right offset;
/// * each window comes back exactly once (forget's or untrack's), and A's
///   memory is freed exactly once.
fn lookup_races_hand_back(faults: Faults) {
    let reg = registry(faults);
    let ledger = Arc::new(Ledger::default());
    let comm = reg.attach(0);
    let a = reg.track(slot_addr(0), STRIDE).unwrap();
    let b = reg.track(slot_addr(1), STRIDE).unwrap();
    let report = reg
        .register_pending(comm, |_, s| {
            ledger.made((comm, *s));
            Ok::<_, Fail>(Some((comm, *s)))
        })
        .unwrap();
    assert_eq!(report.registered, vec![a, b]);
    let (forgotten, untracked) = (flag(), flag());
    let hf = {
        let (reg, ledger, forgotten) = (reg.clone(), ledger.clone(), forgotten.clone());
        thread::spawn(move || {
            forget(&reg, comm, &ledger).expect("attached");
            forgotten.store(true, Ordering::Release);
        })
    };
    let hu = {
        let (reg, ledger, untracked) = (reg.clone(), ledger.clone(), untracked.clone());
        thread::spawn(move || {
            untrack(&reg, a.addr, &ledger).expect("A is tracked");
            untracked.store(true, Ordering::Release);
        })
    };
    let forgot_before = forgotten.load(Ordering::Acquire);
    if let Ok(w) = reg.window_of(comm, b.addr + 16, 8) {
        assert!(
            !forgot_before,
            "a lookup returned a window already handed back"
        );
        assert_eq!((w.window, w.offset, w.segment), ((comm, b), 16, b));
    }
    let gone_before = untracked.load(Ordering::Acquire) || forgotten.load(Ordering::Acquire);
    if let Ok(w) = reg.window_of(comm, a.addr, 8) {
        assert!(
            !gone_before,
            "a lookup returned a window already handed back"
        );
        assert_eq!((w.window, w.offset), ((comm, a), 0));
    }
    hf.join().unwrap();
    hu.join().unwrap();
    ledger.assert_windows_exactly_once();
    ledger.assert_freed_exactly_once(&BTreeSet::from([a]));
}

static RUNS_8: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model8_window_lookup_races_forget_and_untrack() {
    Model::new("8 window lookup races forget and untrack", 3)
        .check(&RUNS_8, || lookup_races_hand_back(Faults::NONE));
}

static RUNS_8N: AtomicUsize = AtomicUsize::new(0);
#[test]
#[should_panic(expected = "a lookup returned a window already handed back")]
fn model8_negative_lookup_ignores_forget_returns_a_handed_back_window() {
    let f = faults(|f| f.lookup_ignores_forget = true);
    Model::new("8- lookup ignores forget", 3).check_fails(
        &RUNS_8N,
        "a lookup returned a window already handed back",
        move || lookup_races_hand_back(f),
    );
}

// --------------------------------------------------------------------------
// Model 9: page-map lookups racing a track that reuses an untracked address.
// --------------------------------------------------------------------------

/// W (grid slot 0) and V (slot 1) are tracked and registered. One thread
/// untracks W while another tracks X at W's address (address reuse: X may
/// replace W's slot in the page map); the main thread runs a pass, then
/// looks the address up. With `granule` one stride, W and X each have
/// their granule to themselves; with four strides, W, X and V share one
/// granule (counted slots, answered by the skiplist).
///
/// * a segment that a finished pass registered, and that nobody untracks,
///   is found, with its window;
/// * a lookup that begins after W's untrack returned never finds W;
/// * a lookup that begins after X's track returned finds X;
/// * a lookup finds only W, X or nothing at that address.
fn page_map_races_address_reuse(faults: Faults, granule: usize) {
    let reg = Arc::new(new_registry(faults).with_page_granule(granule));
    let ledger = Arc::new(Ledger::default());
    let comm = reg.attach(0);
    let w = reg.track(slot_addr(0), STRIDE).unwrap();
    let v = reg.track(slot_addr(1), STRIDE).unwrap();
    assert_eq!(pass_ok(&reg, comm, &ledger).registered, vec![w, v]);
    let (w_gone, x_tracked) = (flag(), flag());
    let hw = {
        let (reg, ledger, w_gone) = (reg.clone(), ledger.clone(), w_gone.clone());
        thread::spawn(move || {
            untrack(&reg, w.addr, &ledger).expect("W is tracked");
            w_gone.store(true, Ordering::Release);
        })
    };
    let hx = {
        let (reg, x_tracked) = (reg.clone(), x_tracked.clone());
        thread::spawn(move || {
            let x = reg.track(slot_addr(0), STRIDE);
            if x.is_ok() {
                x_tracked.store(true, Ordering::Release);
            }
            x.ok()
        })
    };
    let out = pass_ok(&reg, comm, &ledger);
    for s in &out.registered {
        let found = reg.window_of(comm, s.addr + 8, 8);
        assert!(
            matches!(found, Ok(f) if f.window == (comm, *s) && f.offset == 8),
            "a segment a finished pass registered was not found: {s:?}, {found:?}"
        );
    }
    let w_gone_before = w_gone.load(Ordering::Acquire);
    let x_before = x_tracked.load(Ordering::Acquire);
    let found = reg.find(slot_addr(0) + 8);
    if let Some(s) = found {
        assert!(
            s.addr == w.addr && s.len == STRIDE,
            "a stranger was found: {s:?}"
        );
    }
    if w_gone_before {
        assert_ne!(found, Some(w), "found a segment whose untrack had returned");
    }
    if x_before {
        assert!(
            found.is_some_and(|s| s.seq > v.seq),
            "a tracked segment was not found: {found:?}"
        );
    }
    assert_eq!(reg.find(v.addr), Some(v));
    hw.join().unwrap();
    let x = hx.join().unwrap();
    // Once both are done, the address holds X or nothing.
    assert_eq!(reg.find(slot_addr(0)), x);
    drop(drain(&reg, &ledger));
    ledger.assert_windows_exactly_once();
}

static RUNS_9: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model9_page_map_lookups_race_address_reuse() {
    Model::new("9 page map races address reuse", 3).check(&RUNS_9, || {
        page_map_races_address_reuse(Faults::NONE, STRIDE)
    });
}

static RUNS_9S: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model9_shared_granule_lookups_race_address_reuse() {
    Model::new("9s shared granule races address reuse", 3).check(&RUNS_9S, || {
        page_map_races_address_reuse(Faults::NONE, 4 * STRIDE)
    });
}

static RUNS_9N: AtomicUsize = AtomicUsize::new(0);
#[test]
#[should_panic(expected = "a segment a finished pass registered was not found")]
fn model9_negative_late_page_publish_misses_a_registered_segment() {
    Model::new("9- late page publish", 3).check_fails(
        &RUNS_9N,
        "a segment a finished pass registered was not found",
        || page_map_races_address_reuse(faults(|f| f.late_page_publish = true), STRIDE),
    );
}

// --------------------------------------------------------------------------
// Model 10: a slot never names a retired node.
// --------------------------------------------------------------------------

/// W, V, T, T2 tracked; sweeps on (`with_sweep_slack(0)`). One thread
/// untracks W; another tracks a range at W's address that overlaps V (so it
/// is always rejected, but its insert may meet W dead and take W out of the
/// index before W's untrack has withdrawn it from the page map); a third
/// untracks T and T2 (which sweeps) and then looks W's address up, while
/// the main thread waits (so each of those switches is free, and the
/// three-thread race fits the preemption bound).
///
/// * no node is read after it could have been freed (model reclaimer);
/// * the lookup finds W or nothing;
/// * the overlapping track is refused.
fn page_map_slot_outlives_index_removal(faults: Faults) {
    let reg = sweeping_registry(faults);
    let w = reg.track(slot_addr(0), STRIDE).unwrap();
    let _v = reg.track(slot_addr(1), STRIDE).unwrap();
    let t = reg.track(slot_addr(2), STRIDE).unwrap();
    let t2 = reg.track(slot_addr(3), STRIDE).unwrap();
    let hu = {
        let reg = reg.clone();
        thread::spawn(move || drop(reg.untrack(w.addr).expect("W is tracked")))
    };
    let hx = {
        let reg = reg.clone();
        thread::spawn(move || reg.track(slot_addr(0), 2 * STRIDE).is_err())
    };
    let hs = {
        let reg = reg.clone();
        thread::spawn(move || {
            drop(reg.untrack(t.addr).expect("T is tracked"));
            drop(reg.untrack(t2.addr).expect("T2 is tracked"));
            reg.find(slot_addr(0) + 8)
        })
    };
    hu.join().unwrap();
    let refused = hx.join().unwrap();
    let found = hs.join().unwrap();
    assert!(refused, "a track overlapping a live segment was accepted");
    assert!(
        found.is_none() || found == Some(w),
        "a stranger was found: {found:?}"
    );
    assert_eq!(reg.find(slot_addr(0)), None);
}

static RUNS_10: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model10_page_map_slot_outlives_index_removal() {
    Model::new("10 slot outlives index removal", 3)
        .max_branches(20_000)
        .check(&RUNS_10, || {
            page_map_slot_outlives_index_removal(Faults::NONE)
        });
}

static RUNS_10N: AtomicUsize = AtomicUsize::new(0);
#[test]
#[should_panic(expected = "access to a reclaimed node")]
fn model10_negative_skip_page_withdraw_leaves_a_slot_naming_a_freed_node() {
    Model::new("10- skip page withdraw", 3)
        .max_branches(20_000)
        .check_fails(&RUNS_10N, "access to a reclaimed node", || {
            page_map_slot_outlives_index_removal(faults(|f| f.skip_page_withdraw = true))
        });
}

// --------------------------------------------------------------------------
// Model 11: counts stay exact when a late withdrawal meets a new sharer.
// --------------------------------------------------------------------------

/// Page granule of four strides. M and K share a granule (count 2); K
/// leaves (count 1). One thread untracks M while the main thread tracks Y
/// over the whole granule (possible once M is dead), untracks it, tracks P
/// and Q in the granule and untracks Q; M's withdrawal may run at any point
/// of that, or stall in the middle.
///
/// * once everything is done, P (live throughout its part) is found.
fn page_map_count_survives_a_late_withdraw(faults: Faults) {
    let reg = Arc::new(new_registry(faults).with_page_granule(4 * STRIDE));
    let m = reg.track(slot_addr(0), STRIDE).unwrap();
    let k = reg.track(slot_addr(1), STRIDE).unwrap();
    drop(reg.untrack(k.addr).unwrap());
    let hm = {
        let reg = reg.clone();
        thread::spawn(move || drop(reg.untrack(m.addr).expect("M is tracked")))
    };
    // Y (and P, which overlaps M) can be tracked only once M is dead.
    let Ok(y) = reg.track(slot_addr(0), 4 * STRIDE) else {
        hm.join().unwrap();
        return;
    };
    drop(reg.untrack(y.addr).unwrap());
    let p = reg.track(slot_addr(0), STRIDE).unwrap();
    let q = reg.track(slot_addr(1), STRIDE).unwrap();
    drop(reg.untrack(q.addr).unwrap());
    hm.join().unwrap();
    assert_eq!(
        reg.find(slot_addr(0) + 8),
        Some(p),
        "a live segment was not found after its neighbours left"
    );
}

static RUNS_11: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model11_page_map_count_survives_a_late_withdraw() {
    Model::new("11 count survives a late withdraw", 3)
        .max_branches(20_000)
        .check(&RUNS_11, || {
            page_map_count_survives_a_late_withdraw(Faults::NONE)
        });
}

static RUNS_11N: AtomicUsize = AtomicUsize::new(0);
#[test]
#[should_panic(expected = "a live segment was not found after its neighbours left")]
fn model11_negative_page_overwrite_loses_a_live_segment() {
    Model::new("11- page overwrite", 3)
        .max_branches(20_000)
        .check_fails(
            &RUNS_11N,
            "a live segment was not found after its neighbours left",
            || page_map_count_survives_a_late_withdraw(faults(|f| f.page_overwrite = true)),
        );
}

// --------------------------------------------------------------------------
// Model 12: a lookup after forget returned, while the pass is still running.
// --------------------------------------------------------------------------

/// A is tracked; the main thread runs a pass for the comm while another
/// thread forgets the comm and then looks A's window up. `forget` may
/// return (`pass_running`) while the pass is inside its callback; the pass
/// then records A's window and claims it back once it sees the comm
/// forgotten.
///
/// * a lookup made after `forget` returned never finds a window of the
///   forgotten comm;
/// * each window comes back exactly once (from forget or the pass), and
///   A's memory is freed exactly once.
fn lookup_after_forget_races_its_pass(faults: Faults) {
    let reg = registry(faults);
    let ledger = Arc::new(Ledger::default());
    let comm = reg.attach(0);
    let a = reg.track(slot_addr(0), STRIDE).unwrap();
    let hf = {
        let (reg, ledger) = (reg.clone(), ledger.clone());
        thread::spawn(move || {
            forget(&reg, comm, &ledger).expect("attached");
            if let Ok(w) = reg.window_of(comm, a.addr + 8, 8) {
                panic!(
                    "a lookup after forget returned found a window of the forgotten comm: {w:?}"
                );
            }
        })
    };
    let out = pass_ok(&reg, comm, &ledger);
    assert!(out.registered.len() <= 1);
    hf.join().unwrap();
    let gone = drain(&reg, &ledger);
    ledger.assert_windows_exactly_once();
    ledger.assert_freed_exactly_once(&gone);
}

static RUNS_12: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model12_window_lookup_after_forget_returned_finds_nothing() {
    Model::new("12 lookup after forget races its pass", 3).check(&RUNS_12, || {
        lookup_after_forget_races_its_pass(Faults::NONE)
    });
}

static RUNS_12N: AtomicUsize = AtomicUsize::new(0);
#[test]
#[should_panic(expected = "a lookup after forget returned found a window of the forgotten comm")]
fn model12_negative_lookup_ignores_forget_finds_a_forgotten_window() {
    let f = faults(|f| f.lookup_ignores_forget = true);
    Model::new("12- lookup ignores forget", 3).check_fails(
        &RUNS_12N,
        "a lookup after forget returned found a window of the forgotten comm",
        move || lookup_after_forget_races_its_pass(f),
    );
}

// --------------------------------------------------------------------------
// Model 13: what a pass guarantees against tracks and lookups together.
// --------------------------------------------------------------------------

/// One thread tracks E; another tracks Z, then looks E up; the main thread
/// runs a pass, then a second one after both joined.
///
/// What holds (DESIGN.md §1, "Order" and "Fixed set"): each pass registers
/// a seq prefix (the first 1..=k, the second the rest), so ranks whose
/// tracks happen in the same order issue the same registrations; and a
/// lookup finds a segment once its track has returned.
///
/// What does *not* hold, and `claim_linearizable` asserts to show it: that
/// the pass linearizes with the tracks and lookups as one object. E may
/// link, stall before going live, and become the end of the pass's set; Z
/// then links, goes live and returns, and Z's lookup of E finds nothing;
/// the pass helps E live and registers E but not Z. Z's track took effect
/// before E's (a lookup between them saw Z and not E), yet the pass took E
/// and left Z, and no single point of the pass explains that.
fn pass_against_tracks_and_a_lookup(claim_linearizable: bool) {
    let reg = registry(Faults::NONE);
    let ledger = Arc::new(Ledger::default());
    let comm = reg.attach(1);
    let (e_addr, z_addr) = (slot_addr(0), slot_addr(1));
    let (e_done, z_saw_no_e) = (flag(), flag());
    let he = {
        let (reg, e_done) = (reg.clone(), e_done.clone());
        thread::spawn(move || {
            let e = reg.track(e_addr, STRIDE).expect("disjoint tracks succeed");
            // Release: E's track returned before whoever reads `true`.
            e_done.store(true, Ordering::Release);
            e
        })
    };
    let hz = {
        let (reg, e_done, z_saw_no_e) = (reg.clone(), e_done.clone(), z_saw_no_e.clone());
        thread::spawn(move || {
            let z = reg.track(z_addr, STRIDE).expect("disjoint tracks succeed");
            // Acquire: `true` means E's track returned before this lookup.
            let e_returned = e_done.load(Ordering::Acquire);
            let found = reg.find(e_addr + 8);
            assert!(
                !e_returned || found.is_some_and(|s| s.addr == e_addr),
                "a lookup missed a segment whose track had returned"
            );
            if found.is_none() {
                // Release: Z was live, and E not, before whoever reads it.
                z_saw_no_e.store(true, Ordering::Release);
            }
            z
        })
    };
    let mut witness = false;
    let first = pass(&reg, comm, &ledger, |s| {
        // Acquire: see Z's lookup, made after Z's track returned.
        if s.addr == e_addr && z_saw_no_e.load(Ordering::Acquire) {
            witness = true;
        }
        Ok(())
    });
    let (e, z) = (he.join().unwrap(), hz.join().unwrap());
    let second = pass_ok(&reg, comm, &ledger);
    let (first, second) = (first.registered, second.registered);
    assert_no_duplicates([&first[..], &second[..]]);
    assert_seq_increasing(&first);
    let seqs = |v: &[Segment]| v.iter().map(|s| s.seq).collect::<Vec<_>>();
    let k = first.len() as u64;
    assert!(
        seqs(&first) == (1..=k).collect::<Vec<_>>()
            && seqs(&second) == (k + 1..=2).collect::<Vec<_>>(),
        "a pass did not register a seq prefix: {first:?} then {second:?}"
    );
    if claim_linearizable && witness && first.contains(&e) && !first.contains(&z) {
        panic!(
            "a pass registered E but not Z, though Z was live while a lookup found no E: \
             {first:?}"
        );
    }
    let gone = drain(&reg, &ledger);
    ledger.assert_windows_exactly_once();
    ledger.assert_freed_exactly_once(&gone);
}

static RUNS_13: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model13_a_pass_registers_a_seq_prefix_against_tracks_and_lookups() {
    Model::new("13 pass against tracks and a lookup", 3)
        .check(&RUNS_13, || pass_against_tracks_and_a_lookup(false));
}

static RUNS_13N: AtomicUsize = AtomicUsize::new(0);
#[test]
#[should_panic(expected = "a pass registered E but not Z")]
fn model13_negative_a_pass_is_not_linearizable_with_lookups() {
    Model::new("13- the claim that a pass linearizes with lookups", 3).check_fails(
        &RUNS_13N,
        "a pass registered E but not Z",
        || pass_against_tracks_and_a_lookup(true),
    );
}

// --------------------------------------------------------------------------
// Model 14: a lookup never returns a window recorded after its segment died.
// --------------------------------------------------------------------------

/// A is tracked. The main thread runs a pass whose callback first asks
/// whether A is still tracked; one thread untracks A; another looks A's
/// window up. The untrack may kill A while the pass is inside its callback;
/// the pass then still records A's window (its list is not closed yet) and
/// the untrack claims it when it closes the list.
///
/// * a lookup returns a window only if, at some moment of it, the segment
///   was live and the window recorded: never one recorded after the
///   callback saw the segment untracked;
/// * each window comes back exactly once, the memory is freed once.
fn lookup_races_a_record_made_after_untrack(faults: Faults) {
    let reg = registry(faults);
    let ledger = Arc::new(Ledger::default());
    let comm = reg.attach(0);
    let a = reg.track(slot_addr(0), STRIDE).unwrap();
    let hu = {
        let (reg, ledger) = (reg.clone(), ledger.clone());
        thread::spawn(move || {
            untrack(&reg, a.addr, &ledger).expect("A is tracked");
        })
    };
    let hl = {
        let reg = reg.clone();
        thread::spawn(move || reg.window_of(comm, a.addr + 8, 8).is_ok())
    };
    // Bookkeeping of the order loom ran the steps in (a `std` flag): the
    // callback saw A untracked before its window was recorded.
    let dead_before_record = StdAtomicBool::new(false);
    let out = pass(&reg, comm, &ledger, |s| {
        if reg.find(s.addr).is_none() {
            dead_before_record.store(true, StdOrdering::Relaxed);
        }
        Ok(())
    });
    assert!(out.error.is_none());
    hu.join().unwrap();
    let found = hl.join().unwrap();
    assert!(
        !(found && dead_before_record.load(StdOrdering::Relaxed)),
        "a lookup returned a window recorded after its segment was untracked"
    );
    ledger.assert_windows_exactly_once();
    ledger.assert_freed_exactly_once(&BTreeSet::from([a]));
}

static RUNS_14: AtomicUsize = AtomicUsize::new(0);
#[test]
fn model14_window_lookup_never_returns_a_window_recorded_after_untrack() {
    Model::new("14 lookup races a record made after untrack", 3).check(&RUNS_14, || {
        lookup_races_a_record_made_after_untrack(Faults::NONE)
    });
}

static RUNS_14N: AtomicUsize = AtomicUsize::new(0);
#[test]
#[should_panic(expected = "a lookup returned a window recorded after its segment was untracked")]
fn model14_negative_skip_lookup_live_recheck_returns_a_dead_segments_window() {
    let f = faults(|f| f.skip_lookup_live_recheck = true);
    Model::new("14- skip the lookup's live re-check", 3).check_fails(
        &RUNS_14N,
        "a lookup returned a window recorded after its segment was untracked",
        move || lookup_races_a_record_made_after_untrack(f),
    );
}
