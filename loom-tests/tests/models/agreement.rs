//! Checked passes (DESIGN.md §1 Agreement, §3 "checked pass"): the digest
//! a checked pass hands its agreement describes exactly the set it then
//! registers, also while an untrack and a track race it. The negative
//! control computes the digest from a second walk of the log
//! (`digest_from_second_walk`), which an untrack between the pass's hold
//! and that walk makes describe another set.

use std::sync::atomic::AtomicUsize;
use std::sync::Mutex as StdMutex;

use loom::sync::Arc;
use loom::thread;

use segment_registry::{Digest, DigestRange, Faults, Registry, Segment};
use segment_registry_loom::{slot_addr, Model, ModelIndex, STRIDE};

/// Windows are seqs here: the model checks digests, not hand-backs.
type Reg = Registry<u32, u64, ModelIndex>;

fn registry(faults: Faults) -> Arc<Reg> {
    let reg = if faults == Faults::NONE {
        Reg::with_index()
    } else {
        Reg::with_faults(faults)
    };
    Arc::new(reg.with_page_granule(STRIDE))
}

/// A and B (two strides long) are tracked; one thread untracks A, another
/// tracks C, while the main thread runs a checked pass whose agreement is a
/// group of one (it agrees with itself). The digest given to the agreement
/// must be exactly the digest of the segments the pass registered.
fn digest_races_untrack_and_track(faults: Faults) {
    let reg = registry(faults);
    let comm = reg.attach(0);
    let a = reg.track(slot_addr(0), STRIDE).unwrap();
    let _b = reg.track(slot_addr(1), 2 * STRIDE).unwrap();
    let hu = {
        let reg = reg.clone();
        thread::spawn(move || {
            let u = reg.untrack(a.addr).expect("A is tracked");
            if let Some(h) = u.pass_hold {
                let _ = h.release();
            }
        })
    };
    let ht = {
        let reg = reg.clone();
        thread::spawn(move || {
            reg.track(slot_addr(3), STRIDE).expect("disjoint");
        })
    };
    // Bookkeeping outside the model (loom runs one thread at a time).
    let given = StdMutex::new(None);
    let result = reg.register_pending_checked(
        comm,
        |_, d| {
            *given.lock().unwrap() = Some(*d);
            Ok::<_, ()>(DigestRange::of_one(*d))
        },
        |_, s| Ok(Some(s.seq)),
    );
    let report = result.expect("a group of one agrees");
    let registered: Vec<Segment> = report.registered.clone();
    for h in report.handed_back {
        let _ = h.hold.release();
    }
    let d = given.lock().unwrap().expect("the agreement ran");
    assert!(
        d == Digest::of_set(1, &registered),
        "the digest does not describe the set the pass registered: {d:?} for {registered:?}"
    );
    hu.join().unwrap();
    ht.join().unwrap();
}

static RUNS: AtomicUsize = AtomicUsize::new(0);
#[test]
fn a_checked_pass_digest_describes_the_set_it_registers() {
    Model::new(
        "agreement::a_checked_pass_digest_describes_the_set_it_registers",
        3,
    )
    .check(&RUNS, || digest_races_untrack_and_track(Faults::NONE));
}

static RUNS_N: AtomicUsize = AtomicUsize::new(0);
#[test]
#[should_panic(expected = "the digest does not describe the set the pass registered")]
fn negative_digest_from_a_second_walk_describes_another_set() {
    let f = Faults {
        digest_from_second_walk: true,
        ..Faults::NONE
    };
    Model::new(
        "agreement::negative_digest_from_a_second_walk_describes_another_set",
        3,
    )
    .check_fails(
        &RUNS_N,
        "the digest does not describe the set the pass registered",
        move || digest_races_untrack_and_track(f),
    );
}
