//! Fixed set (DESIGN.md §1, also Order and No duplicates): tracks racing a
//! pass. A pass registers exactly a seq prefix: every segment whose track
//! returned before it began, none whose track began after its set was
//! fixed, in seq order; the next pass registers the rest.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicUsize;

use loom::sync::atomic::Ordering;
use loom::sync::Arc;
use loom::thread;

use segment_registry::{Faults, Segment};
use segment_registry_loom::{slot_addr, Model, STRIDE};

use crate::common::{
    assert_no_duplicates, assert_seq_increasing, drain, faults, flag, pass, pass_ok, registry,
    Ledger,
};

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

#[test]
fn tracks_race_a_pass() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new("fixed_set::tracks_race_a_pass", 3).check(&RUNS, || tracks_race_pass(Faults::NONE));
}

#[test]
#[should_panic(expected = "a tracked segment was never registered")]
fn negative_naive_cursor_misses_a_segment() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let f = faults(|f| f.naive_cursor = true);
    Model::new("fixed_set::negative_naive_cursor_misses_a_segment", 3).check_fails(
        &RUNS,
        "a tracked segment was never registered",
        move || tracks_race_pass(f),
    );
}
