//! Each deliberately broken variant (`Faults`) that the registry's own code
//! takes a branch for, turned on here and seen failing the way its
//! documentation says, beside the shipped registry passing the same
//! script. The loom models use the same switches as their negative
//! controls; these tests keep the branches honest in the registry's own
//! suite (and give mutation testing something to judge them by).
//!
//! The page map's `page_overwrite` control is tested beside the map
//! (`src/pagemap.rs`), where its slots can be read.
#![cfg(not(feature = "loom"))]

mod common;

use std::thread;

use common::parking::{arm, resume, wait_parked, ParkingIndex, Point};
use segment_registry::{AddressIndex, CommId, Faults, Registry, Segment};

const G: usize = 2 << 20;
const NAIVE: Faults = Faults {
    naive_cursor: true,
    ..Faults::NONE
};

/// A pass that registers everything; returns what it registered.
fn pass<I: AddressIndex>(reg: &Registry<u32, u64, I>, comm: CommId) -> Vec<Segment> {
    reg.register_pending(comm, |_, s| Ok::<_, ()>(Some(s.seq)))
        .expect("pass")
        .registered
}

/// The seqs of what a pass registered.
fn seqs(segs: &[Segment]) -> Vec<u64> {
    segs.iter().map(|s| s.seq).collect()
}

/// Thread A starts `track(X)` and parks in its insert; meanwhile this
/// thread tracks Y and runs a pass; A goes on; then two more passes run.
/// Returns the three passes' registrations.
fn track_in_flight_during_a_pass(faults: Faults, x: usize) -> [Vec<Segment>; 3] {
    let y = x + 4 * G;
    let point = Point::Insert(x);
    arm(point);
    let reg: Registry<u32, u64, ParkingIndex> = Registry::with_faults(faults);
    let comm = reg.attach(1);
    thread::scope(|s| {
        let a = s.spawn(|| reg.track(x, G).expect("X"));
        wait_parked(point);
        reg.track(y, G).expect("Y");
        let first = pass(&reg, comm);
        resume(point);
        a.join().unwrap();
        [first, pass(&reg, comm), pass(&reg, comm)]
    })
}

#[test]
fn shipped_cursor_registers_a_track_that_was_in_flight_at_the_next_pass() {
    const X: usize = 0x5a00_0000_0000;
    let [first, second, third] = track_in_flight_during_a_pass(Faults::NONE, X);
    assert_eq!(
        first.iter().map(|s| s.addr).collect::<Vec<_>>(),
        [X + 4 * G]
    );
    assert_eq!(seqs(&first), [1], "Y is first in the log");
    assert_eq!(second.iter().map(|s| s.addr).collect::<Vec<_>>(), [X]);
    assert_eq!(seqs(&second), [2], "X's seq is fixed when it joins the log");
    assert!(third.is_empty());
}

#[test]
fn naive_cursor_misses_a_segment_for_good() {
    let [first, second, third] = track_in_flight_during_a_pass(NAIVE, 0x5a80_0000_0000);
    // X took seq 1 before it parked, Y seq 2; the first pass saw seq 2 ...
    assert_eq!(seqs(&first), [2], "the first pass registers Y");
    // ... so every later pass skips X (seq 1) although it never registered.
    assert!(
        second.is_empty() && third.is_empty(),
        "X is missed: {second:?} {third:?}"
    );
}

#[test]
fn naive_cursor_burns_a_seq_on_a_rejected_track() {
    let run = |faults: Faults| {
        let reg: Registry<u32, u64> = Registry::with_faults(faults);
        let comm = reg.attach(1);
        let a = reg.track(0x6000_0000_0000, G).unwrap();
        reg.track(0x6000_0000_0000, G).expect_err("overlaps A");
        let b = reg.track(0x6000_0000_0000 + G, G).unwrap();
        assert_eq!(seqs(&pass(&reg, comm)), [a.seq, b.seq]);
        (a.seq, b.seq)
    };
    assert_eq!(
        run(Faults::NONE),
        (1, 2),
        "seqs are 1, 2, 3, ... in log order"
    );
    assert_eq!(run(NAIVE), (1, 3), "the rejected track took seq 2");
}

/// `digest_from_second_walk` digests what a second walk of the log finds,
/// which differs from the held set only when an untrack or a track races
/// the pass between the two walks (the loom model `agreement` shows that
/// race). Without one, the control must describe the same set as the
/// shipped pass, so that its failure under the race is the race's alone.
#[test]
fn digest_from_second_walk_agrees_with_the_held_set_without_a_race() {
    let run = |faults: Faults| {
        let reg: Registry<u32, u64> = Registry::with_faults(faults);
        let comm = reg.attach(1);
        let a = reg.track(0x6100_0000_0000, G).unwrap();
        let b = reg.track(0x6100_0000_0000 + 2 * G, 3 * G).unwrap();
        let dead = reg.track(0x6100_0000_0000 + 8 * G, G).unwrap();
        drop(reg.untrack(dead.addr).unwrap());
        let mut seen = None;
        let report = reg
            .register_pending_checked(
                comm,
                |_, d| {
                    seen = Some(*d);
                    Ok::<_, ()>(segment_registry::DigestRange::of_one(*d))
                },
                |_, s| Ok(Some(s.seq)),
            )
            .unwrap();
        assert_eq!(report.registered, [a, b]);
        let d = seen.expect("agree was called");
        assert_eq!(d, segment_registry::Digest::of_set(1, &[a, b]));
        d
    };
    let control = run(Faults {
        digest_from_second_walk: true,
        ..Faults::NONE
    });
    assert_eq!(control, run(Faults::NONE));
}
