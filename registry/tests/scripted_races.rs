//! Races of the registry's own operations, scripted with an index that
//! parks one track at a chosen step (`common/parking.rs`), so that an
//! interleaving the stress tests reach only by chance runs every time.
#![cfg(not(feature = "loom"))]

mod common;

use std::thread;

use common::parking::{arm, resume, wait_parked, ParkingIndex, Point};
use segment_registry::{Registry, TrackError};

const G: usize = 2 << 20;

/// A track parked after its overlap scan (pending, not committed) loses to
/// an overlapping track with the lower start, which rejects it: the loser's
/// error names the winner's range, as a loser found by its own scan would.
#[test]
fn a_pending_track_rejected_by_a_racing_winner_names_the_winner() {
    const A: usize = 0x5b00_0000_0000 + G; // the loser: the higher start
    const B: usize = A - G / 2; // overlaps A's first half
    let point = Point::AfterScan(A);
    arm(point);
    let reg: Registry<u32, u64, ParkingIndex> = Registry::with_index();
    let (a, b) = thread::scope(|s| {
        let a = s.spawn(|| reg.track(A, G));
        wait_parked(point);
        let b = reg.track(B, G);
        resume(point);
        (a.join().unwrap(), b)
    });
    let b = b.expect("the lower start wins");
    assert_eq!(
        a,
        Err(TrackError::Overlap {
            addr: A,
            len: G,
            other_addr: B,
            other_len: G
        })
    );
    assert_eq!(reg.find(A + G - 1), None, "the loser left no trace");
    assert_eq!(reg.find(A), Some(b));
    assert_eq!(reg.segments(), [b]);
}

/// An untrack parked after making its segment dead, before its index entry
/// is gone: a track of the same address meets the stale entry, helps
/// remove it and succeeds (the address is free once the untrack's
/// linearization point has passed).
#[test]
fn a_retrack_meeting_the_stale_entry_of_a_racing_untrack_removes_it_and_succeeds() {
    const X: usize = 0x5c00_0000_0000;
    let reg: Registry<u32, u64, ParkingIndex> = Registry::with_index();
    let old = reg.track(X, G).unwrap();
    let point = Point::Remove(X);
    arm(point);
    let (gone, new) = thread::scope(|s| {
        let u = s.spawn(|| reg.untrack(X).map(|u| u.segment));
        wait_parked(point);
        assert_eq!(reg.find(X), None, "dead once its untrack linearized");
        let new = reg.track(X, G);
        resume(point);
        (u.join().unwrap(), new)
    });
    assert_eq!(gone, Ok(old));
    let new = new.expect("the stale entry is no obstacle");
    assert!(new.seq > old.seq);
    assert_eq!(reg.find(X), Some(new));
    assert_eq!(reg.segments(), [new]);
}
