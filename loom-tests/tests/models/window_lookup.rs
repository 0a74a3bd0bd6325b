//! The window lookup `window_of` (DESIGN.md §1 Linearizability, §3 "window
//! lookup"): racing forget, untrack and a pass still inside its callback,
//! it never returns a window already handed back, one of a comm whose
//! `forget` had returned, or one recorded after its segment died; a window
//! it returns is the segment's, at the right offset.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool as StdAtomicBool, AtomicUsize, Ordering as StdOrdering};

use loom::sync::atomic::Ordering;
use loom::sync::Arc;
use loom::thread;

use segment_registry::Faults;
use segment_registry_loom::{slot_addr, Model, STRIDE};

use crate::common::{drain, faults, flag, forget, pass, pass_ok, registry, untrack, Fail, Ledger};

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

#[test]
fn races_forget_and_untrack() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new("window_lookup::races_forget_and_untrack", 3)
        .check(&RUNS, || lookup_races_hand_back(Faults::NONE));
}

#[test]
#[should_panic(expected = "a lookup returned a window already handed back")]
fn negative_lookup_ignores_forget_returns_a_handed_back_window() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let f = faults(|f| f.lookup_ignores_forget = true);
    Model::new(
        "window_lookup::negative_lookup_ignores_forget_returns_a_handed_back_window",
        3,
    )
    .check_fails(
        &RUNS,
        "a lookup returned a window already handed back",
        move || lookup_races_hand_back(f),
    );
}

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

#[test]
fn after_forget_returned_finds_nothing() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new("window_lookup::after_forget_returned_finds_nothing", 3)
        .check(&RUNS, || lookup_after_forget_races_its_pass(Faults::NONE));
}

#[test]
#[should_panic(expected = "a lookup after forget returned found a window of the forgotten comm")]
fn negative_lookup_ignores_forget_finds_a_forgotten_window() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let f = faults(|f| f.lookup_ignores_forget = true);
    Model::new(
        "window_lookup::negative_lookup_ignores_forget_finds_a_forgotten_window",
        3,
    )
    .check_fails(
        &RUNS,
        "a lookup after forget returned found a window of the forgotten comm",
        move || lookup_after_forget_races_its_pass(f),
    );
}

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

#[test]
fn never_returns_a_window_recorded_after_untrack() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new(
        "window_lookup::never_returns_a_window_recorded_after_untrack",
        3,
    )
    .check(&RUNS, || {
        lookup_races_a_record_made_after_untrack(Faults::NONE)
    });
}

#[test]
#[should_panic(expected = "a lookup returned a window recorded after its segment was untracked")]
fn negative_skip_lookup_live_recheck_returns_a_dead_segments_window() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let f = faults(|f| f.skip_lookup_live_recheck = true);
    Model::new(
        "window_lookup::negative_skip_lookup_live_recheck_returns_a_dead_segments_window",
        3,
    )
    .check_fails(
        &RUNS,
        "a lookup returned a window recorded after its segment was untracked",
        move || lookup_races_a_record_made_after_untrack(f),
    );
}
