//! Failure atomicity (DESIGN.md §1): a callback fails mid-pass while a
//! track races it. The failed pass keeps its prefix and reports the failed
//! segment; the retry resumes there; no duplicate, no miss.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicUsize;

use loom::sync::Arc;
use loom::thread;

use segment_registry::{Faults, PassError, Segment};
use segment_registry_loom::{slot_addr, Model, STRIDE};

use crate::common::{
    assert_no_duplicates, assert_seq_increasing, drain, pass, pass_ok, registry, Fail, Ledger,
};

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

#[test]
fn callback_failure_races_a_track() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new("failure_atomicity::callback_failure_races_a_track", 3)
        .check(&RUNS, failure_races_track);
}
