//! Reclamation (DESIGN.md §3 "sweep", §4, §11): sweeps racing readers,
//! appends, each other, passes that hold nodes and a pass's pinned
//! watermark. No node is read after epoch reclamation could have freed it
//! (the model reclaimer panics), every node is retired exactly once, and
//! the log keeps what it must.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicUsize;

use loom::sync::atomic::Ordering;
use loom::sync::Arc;
use loom::thread;

use segment_registry::Faults;
use segment_registry_loom::{slot_addr, Model, STRIDE};

use crate::common::{
    assert_nodes_accounted, check_reads, drain, faults, flag, pass_ok, sweeping_registry, untrack,
    Ledger,
};
use crate::exactly_once_windows::untrack_races_pass;

/// `exactly_once_windows::untrack_races_a_pass_holding_the_segment` with
/// sweeps (`with_sweep_slack(0)`, C and D tracked after B): the second
/// untrack sweeps while the pass may still hold A or B, and after a drain
/// every node but the last two was retired exactly once.
#[test]
fn untracks_and_sweeps_race_a_holding_pass() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new("reclamation::untracks_and_sweeps_race_a_holding_pass", 3)
        .check(&RUNS, || untrack_races_pass(Faults::NONE, 2, true));
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

#[test]
fn readers_race_an_untrack_and_its_sweep() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new("reclamation::readers_race_an_untrack_and_its_sweep", 3)
        .check(&RUNS, || readers_race_untrack_and_sweep(Faults::NONE));
}

#[test]
#[should_panic(expected = "access to a reclaimed node (model reclaimer)")]
fn negative_free_without_defer_touches_a_reclaimed_node() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let f = faults(|f| f.free_without_defer = true);
    Model::new(
        "reclamation::negative_free_without_defer_touches_a_reclaimed_node",
        3,
    )
    .check_fails(
        &RUNS,
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

#[test]
fn two_sweeps_race_a_reader_and_an_append() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new("reclamation::two_sweeps_race_a_reader_and_an_append", 3)
        .check(&RUNS, concurrent_sweeps_race_a_reader_and_an_append);
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

#[test]
fn a_pass_races_the_sweep_around_its_watermark() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new(
        "reclamation::a_pass_races_the_sweep_around_its_watermark",
        3,
    )
    .check(&RUNS, pass_races_untrack_and_sweep);
}
