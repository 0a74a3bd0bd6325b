//! Overlap (DESIGN.md §1, §5): at most one of two overlapping ranges is
//! live, when two tracks race each other and when a track races the
//! untrack of the segment it overlaps; a rejected range never reaches a
//! pass.

use std::sync::atomic::AtomicUsize;

use loom::sync::atomic::Ordering;
use loom::sync::Arc;
use loom::thread;

use segment_registry::{Faults, Segment, TrackError};
use segment_registry_loom::{slot_addr, Model, STRIDE};

use crate::common::{drain, faults, flag, pass_ok, registry, untrack, Ledger};

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

#[test]
fn overlapping_tracks_race() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new("overlap::overlapping_tracks_race", 3)
        .check(&RUNS, || overlapping_tracks(Faults::NONE));
}

#[test]
#[should_panic(expected = "both overlapping tracks are live")]
fn negative_skip_overlap_fence_lets_both_live() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let f = faults(|f| f.skip_overlap_fence = true);
    Model::new("overlap::negative_skip_overlap_fence_lets_both_live", 3).check_fails(
        &RUNS,
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

#[test]
fn track_races_untrack_of_the_overlapped_segment() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new("overlap::track_races_untrack_of_the_overlapped_segment", 3)
        .check(&RUNS, track_races_untrack_of_overlapped);
}
