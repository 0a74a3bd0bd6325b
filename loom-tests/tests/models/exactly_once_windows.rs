//! Exactly-once windows (DESIGN.md §1): untracks and forget racing a pass.
//! Every window a callback returned comes back exactly once (from untrack,
//! forget, the pass's hand-backs or drain), and every untracked segment's
//! memory is freed exactly once, never while one of its windows is
//! registered.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool as StdAtomicBool, AtomicUsize, Ordering as StdOrdering};

use loom::sync::Arc;
use loom::thread;

use segment_registry::{CommError, Faults, PassError, Segment};
use segment_registry_loom::{slot_addr, Model, STRIDE};

use crate::common::{
    assert_nodes_accounted, assert_seq_increasing, drain, faults, forget, pass, pass_ok, registry,
    sweeping_registry, untrack, Ledger,
};

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
pub(crate) fn untrack_races_pass(faults: Faults, untrackers: usize, sweep: bool) {
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
    // Schedule-order observations (see the crate docs, main.rs): the protocol
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

#[test]
fn untrack_races_a_pass_holding_the_segment() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new(
        "exactly_once_windows::untrack_races_a_pass_holding_the_segment",
        3,
    )
    .check(&RUNS, || untrack_races_pass(Faults::NONE, 2, false));
}

#[test]
#[should_panic(expected = "a window was not handed back exactly once")]
fn negative_unchecked_window_add_loses_the_window() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let f = faults(|f| f.unchecked_window_add = true);
    Model::new(
        "exactly_once_windows::negative_unchecked_window_add_loses_the_window",
        3,
    )
    .check_fails(
        &RUNS,
        "a window was not handed back exactly once",
        move || untrack_races_pass(f, 1, false),
    );
}

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

#[test]
fn forget_races_a_pass() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new("exactly_once_windows::forget_races_a_pass", 3)
        .check(&RUNS, || forget_races_pass(false));
}

#[test]
fn forget_races_a_pass_and_an_untrack() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new(
        "exactly_once_windows::forget_races_a_pass_and_an_untrack",
        3,
    )
    .check(&RUNS, || forget_races_pass(true));
}
