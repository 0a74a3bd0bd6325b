//! No duplicates (DESIGN.md §1, also Progress): two passes for one comm
//! and a racing track. No segment is registered twice with the comm; a
//! second pass fails only with `Busy`; nothing is missed.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicUsize;

use loom::sync::Arc;
use loom::thread;

use segment_registry::{CommError, Faults, PassError, Segment};
use segment_registry_loom::{slot_addr, Model, STRIDE};

use crate::common::{
    assert_no_duplicates, assert_seq_increasing, drain, pass_ok, registry, Ledger,
};

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

#[test]
fn two_passes_for_one_comm() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new("no_duplicates::two_passes_for_one_comm", 3).check(&RUNS, two_passes_one_comm);
}
