//! Linearizability (DESIGN.md §1, §6): lookups and iteration racing an
//! untrack see a whole segment or none, never one untracked before they
//! began; and what a pass is linearizable with: tracks placed at their log
//! link (each pass registers a seq prefix), *not* tracks and lookups
//! together (the negative control finds the history of §6).

use std::collections::BTreeSet;
use std::sync::atomic::AtomicUsize;

use loom::sync::atomic::Ordering;
use loom::sync::Arc;
use loom::thread;

use segment_registry::{Faults, Segment};
use segment_registry_loom::{slot_addr, Model, STRIDE};

use crate::common::{
    assert_no_duplicates, assert_seq_increasing, check_reads, drain, flag, pass, pass_ok, registry,
    untrack, Ledger,
};

/// A and B are tracked; one thread untracks A while the main thread looks
/// up and iterates (no sweep: `reclamation::readers_race_an_untrack_and_its_sweep`
/// is the variant that sweeps).
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

#[test]
fn lookups_and_iteration_race_an_untrack() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new("linearizability::lookups_and_iteration_race_an_untrack", 3)
        .check(&RUNS, readers_race_untrack);
}

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

#[test]
fn a_pass_registers_a_seq_prefix_against_tracks_and_lookups() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new(
        "linearizability::a_pass_registers_a_seq_prefix_against_tracks_and_lookups",
        3,
    )
    .check(&RUNS, || pass_against_tracks_and_a_lookup(false));
}

#[test]
#[should_panic(expected = "a pass registered E but not Z")]
fn negative_a_pass_is_not_linearizable_with_lookups() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new(
        "linearizability::negative_a_pass_is_not_linearizable_with_lookups",
        3,
    )
    .check_fails(&RUNS, "a pass registered E but not Z", || {
        pass_against_tracks_and_a_lookup(true)
    });
}
