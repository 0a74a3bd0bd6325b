//! Bad input and faults: every bad input returns its typed error and
//! leaves the registry exactly as it was (full snapshots compared, and the
//! hidden state too: a twin registry that never saw the bad input must hand
//! back the same windows and segments when both are drained); and a
//! callback that panics reaches the caller with its payload while the
//! registry stays consistent.
#![cfg(not(feature = "loom"))]

use std::panic::{catch_unwind, AssertUnwindSafe};

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use segment_registry::{CommError, CommId, PassError, Registry, Segment, TrackError, UntrackError};
use segment_registry_proptests::env_count;
use segment_registry_proptests::model::{Payload, Window};
use segment_registry_proptests::ops::{Snapshot, GRANULE};
use segment_registry_proptests::strategies::{track_args, SLOTS};

type Reg = Registry<Payload, Window>;

/// A populated registry: segments, comm 1 with windows on all of them,
/// comm 2 with windows on some, comm 3 forgotten.
fn populated(tracks: &[(usize, usize)]) -> Reg {
    let reg = Reg::new();
    for &(a, l) in tracks {
        let _ = reg.track(a, l);
    }
    let c1 = reg.attach(10);
    let c2 = reg.attach(20);
    let c3 = reg.attach(30);
    let mut w = 0;
    let report = reg
        .register_pending(c1, |_, _| {
            w += 1;
            Ok::<_, ()>(Some(w))
        })
        .expect("pass");
    assert!(report.handed_back.is_empty() && report.free_now.is_empty());
    drop(report);
    let mut n = 0;
    let _ = reg.register_pending(c2, |_, _| {
        n += 1;
        if n == 3 {
            Err(())
        } else {
            w += 1;
            Ok(Some(w))
        }
    });
    let _ = reg.register_pending(c3, |_, _| Ok::<_, ()>(None));
    let f = reg.forget(c3).expect("attached");
    assert!(f.windows.is_empty() && f.free_now.is_empty());
    drop(f);
    reg
}

/// Every segment with its windows, and every comm with its windows.
type Everything = (
    Vec<(Segment, Vec<(CommId, Window)>)>,
    Vec<(CommId, Vec<Window>)>,
);

/// Everything the registry still holds, taken out: every segment with its
/// windows, and every comm's remaining windows.
fn take_all(reg: &Reg) -> Everything {
    let mut comms = Vec::new();
    for c in reg.comms() {
        let f = reg.forget(c).expect("attached");
        comms.push((c, f.windows.into_iter().map(|h| h.window).collect()));
    }
    let segs = reg
        .drain()
        .into_iter()
        .map(|u| {
            let mut w = u.windows;
            w.sort();
            (u.segment, w)
        })
        .collect();
    (segs, comms)
}

/// Normalizes node counts that a rejected track legitimately moves (it
/// allocates a node and retires it) and that the epoch reclaimer moves on
/// its own schedule.
fn normalized(mut s: Snapshot) -> Snapshot {
    s.stats.nodes.allocated = 0;
    s.stats.nodes.retired = 0;
    s.stats.nodes.freed = 0;
    s
}

/// A bad input.
#[derive(Clone, Debug)]
enum Bad {
    Track(usize, usize),
    Untrack(usize),
    Pass(CommId),
    Forget(CommId),
    Pending(CommId),
}

/// Applies `bad` to `reg`, checks it fails with a typed error, and returns
/// whether it allocated a node (a rejected overlap does).
fn apply_bad(reg: &Reg, bad: &Bad) -> u64 {
    match *bad {
        Bad::Track(addr, len) => match reg.track(addr, len) {
            Err(TrackError::ZeroLength { addr: a }) => {
                assert_eq!((a, len), (addr, 0));
                0
            }
            Err(TrackError::Overflow { addr: a, len: l }) => {
                assert_eq!((a, l), (addr, len));
                assert!(addr.checked_add(len).is_none());
                0
            }
            Err(TrackError::Overlap {
                addr: a,
                len: l,
                other_addr,
                other_len,
            }) => {
                assert_eq!((a, l), (addr, len));
                let other = reg
                    .segments()
                    .into_iter()
                    .find(|s| (s.addr, s.len) == (other_addr, other_len))
                    .expect("names a live segment");
                assert!(other.addr < addr + len && addr < other.end(), "it overlaps");
                1
            }
            Ok(s) => panic!("bad track accepted: {s:?}"),
        },
        Bad::Untrack(addr) => {
            let e = reg.untrack(addr).map(|u| u.segment).expect_err("unknown");
            assert_eq!(e, UntrackError::Unknown { addr });
            0
        }
        Bad::Pass(c) => {
            let mut called = false;
            let f = reg
                .register_pending(c, |_, _| {
                    called = true;
                    Ok::<_, ()>(None)
                })
                .map(|r| r.registered)
                .expect_err("not attached");
            assert!(!called, "no callback on a comm that is not attached");
            assert!(matches!(f.error, PassError::Comm(CommError::NotAttached(x)) if x == c));
            assert!(f.report.registered.is_empty() && f.report.handed_back.is_empty());
            assert!(f.report.free_now.is_empty());
            0
        }
        Bad::Forget(c) => {
            let e = reg.forget(c).map(|f| f.windows.len()).expect_err("gone");
            assert_eq!(e, CommError::NotAttached(c));
            0
        }
        Bad::Pending(c) => {
            assert_eq!(reg.pending(c), Err(CommError::NotAttached(c)));
            0
        }
    }
}

/// Applies `bad` to one of two identical registries and compares them.
fn check_untouched(tracks: &[(usize, usize)], bad: &Bad) {
    let reg = populated(tracks);
    let twin = populated(tracks);
    let before = Snapshot::of(&reg);
    assert_eq!(normalized(before.clone()), normalized(Snapshot::of(&twin)));
    let allocated = apply_bad(&reg, bad);
    let after = Snapshot::of(&reg);
    let (b, a) = (before.stats.nodes, after.stats.nodes);
    assert_eq!(a.allocated, b.allocated + allocated, "{bad:?}");
    assert_eq!(
        a.retired,
        b.retired + allocated,
        "a rejected node is reclaimed: {bad:?}"
    );
    assert_eq!(
        normalized(after),
        normalized(before),
        "{bad:?} changed the registry"
    );
    assert_eq!(
        take_all(&reg),
        take_all(&twin),
        "{bad:?} changed hidden state"
    );
}

const TRACKS: [(usize, usize); 4] = [
    (0x1000, 0x1000),
    (0x3000, 0x2000),
    (0x8000, 0x1000),
    (usize::MAX - 0x1000, 0x1000),
];

#[test]
fn zero_length_is_refused() {
    for addr in [0, 0x1000, 0x1800, usize::MAX] {
        check_untouched(&TRACKS, &Bad::Track(addr, 0));
    }
}

#[test]
fn overflow_is_refused() {
    for (addr, len) in [
        (usize::MAX, 1),
        (1, usize::MAX),
        (usize::MAX - 10, 20),
        (usize::MAX, usize::MAX),
    ] {
        check_untouched(&TRACKS, &Bad::Track(addr, len));
    }
}

#[test]
fn overlap_with_live_is_refused() {
    for (addr, len) in [
        (0x1000, 0x1000),          // the same range
        (0x1000, 0x10),            // same start, shorter
        (0x1800, 0x100),           // inside
        (0x0800, 0x1000),          // across the start
        (0x1800, 0x1000),          // across the end
        (0x0, 0x10000),            // over several
        (0x4fff, 0x1),             // the last byte
        (usize::MAX - 0x10, 0x10), // at the top of the address space
    ] {
        check_untouched(&TRACKS, &Bad::Track(addr, len));
    }
}

#[test]
fn untrack_of_unknown_is_refused() {
    // Never tracked; inside a segment but not its start; its end; one
    // already untracked (twice).
    for addr in [0x0, 0x1800, 0x2000, 0x5000, usize::MAX] {
        check_untouched(&TRACKS, &Bad::Untrack(addr));
    }
    let reg = populated(&TRACKS);
    reg.untrack(0x8000).expect("tracked").windows.len();
    let snap = Snapshot::of(&reg);
    for _ in 0..2 {
        assert_eq!(
            reg.untrack(0x8000).map(|u| u.segment).expect_err("gone"),
            UntrackError::Unknown { addr: 0x8000 }
        );
        assert_eq!(normalized(Snapshot::of(&reg)), normalized(snap.clone()));
    }
}

#[test]
fn comm_errors_are_refused() {
    // Never attached (0 and 4), and forgotten (3).
    for c in [CommId(0), CommId(3), CommId(4), CommId(u64::MAX)] {
        check_untouched(&TRACKS, &Bad::Pass(c));
        check_untouched(&TRACKS, &Bad::Forget(c));
        check_untouched(&TRACKS, &Bad::Pending(c));
    }
    // Forget twice: the second is refused and changes nothing.
    let reg = populated(&TRACKS);
    let f = reg.forget(CommId(1)).expect("attached");
    assert_eq!(f.windows.len(), TRACKS.len());
    drop(f);
    check_untouched_after(&reg, &Bad::Forget(CommId(1)));
    check_untouched_after(&reg, &Bad::Pass(CommId(1)));
}

fn check_untouched_after(reg: &Reg, bad: &Bad) {
    let before = Snapshot::of(reg);
    apply_bad(reg, bad);
    assert_eq!(normalized(Snapshot::of(reg)), normalized(before), "{bad:?}");
}

fn bad_strategy() -> impl Strategy<Value = Bad> {
    prop_oneof![
        (0..SLOTS * GRANULE).prop_map(|a| Bad::Track(a, 0)),
        (any::<usize>(), any::<usize>())
            .prop_filter("overflows", |(a, l)| a.checked_add(*l).is_none())
            .prop_map(|(a, l)| Bad::Track(a, l)),
        track_args().prop_map(|(a, l)| Bad::Track(a, l)),
        (0..SLOTS * GRANULE + GRANULE).prop_map(Bad::Untrack),
        (0..6u64).prop_map(|c| Bad::Pass(CommId(c))),
        (0..6u64).prop_map(|c| Bad::Forget(CommId(c))),
        (0..6u64).prop_map(|c| Bad::Pending(CommId(c))),
    ]
}

proptest! {
    #![proptest_config(Config {
        cases: env_count("PROPTEST_CASES", 10_000) / 5,
        // Inputs that happen to be fine for the registry drawn are skipped.
        max_global_rejects: env_count("PROPTEST_CASES", 10_000),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/bad_input.proptest-regressions",
        ))),
        ..Config::default()
    })]

    /// Random registries, random inputs: an input that fails leaves the
    /// registry exactly as it was.
    #[test]
    fn a_failing_input_changes_nothing(
        tracks in prop::collection::vec(track_args(), 0..8),
        bad in bad_strategy(),
    ) {
        let reg = populated(&tracks);
        // Only inputs that are bad for this registry.
        let is_bad = match bad {
            Bad::Track(a, l) => l == 0
                || a.checked_add(l).is_none()
                || reg.segments().iter().any(|s| s.addr < a + l && a < s.end()),
            Bad::Untrack(a) => !reg.segments().iter().any(|s| s.addr == a),
            Bad::Pass(c) | Bad::Forget(c) | Bad::Pending(c) => !reg.comms().contains(&c),
        };
        prop_assume!(is_bad);
        check_untouched(&tracks, &bad);
    }
}

// ---------------------------------------------------------------------------
// Panicking callbacks
// ---------------------------------------------------------------------------

#[derive(Debug, PartialEq)]
struct Boom(usize);

/// A pass over four segments whose callback panics at the `k`-th: the
/// panic reaches the caller with its payload; the ones before stay
/// registered with their windows; the one it panicked on and the rest stay
/// pending; a retry resumes there; every window comes back exactly once.
#[test]
fn callback_panic_reaches_caller_and_registry_stays_consistent() {
    for k in 0..4 {
        let reg = Reg::new();
        let segs: Vec<Segment> = (0..4)
            .map(|i| reg.track(i * 0x10000, 0x1000).unwrap())
            .collect();
        let c = reg.attach(0);
        let mut seen = Vec::new();
        let r = catch_unwind(AssertUnwindSafe(|| {
            reg.register_pending(c, |_, s| {
                seen.push(*s);
                if seen.len() == k + 1 {
                    std::panic::panic_any(Boom(k));
                }
                Ok::<_, ()>(Some(s.seq * 100))
            })
            .map(|r| r.registered)
        }));
        let payload = r.expect_err("the panic propagates");
        assert_eq!(payload.downcast_ref::<Boom>(), Some(&Boom(k)));
        assert_eq!(seen, segs[..=k]);
        // Registered before the panic: recorded; from it on: pending.
        assert_eq!(reg.pending(c), Ok(4 - k));
        let st = reg.stats();
        assert_eq!(st.comms[0].windows, k, "windows recorded before the panic");
        // Not busy: a retry resumes at the segment it panicked on.
        let retry = reg
            .register_pending(c, |_, s| Ok::<_, ()>(Some(s.seq * 100)))
            .expect("retry");
        assert_eq!(retry.registered, segs[k..]);
        assert_eq!(reg.pending(c), Ok(0));
        // Every window exactly once: half by untrack, the rest by forget.
        let mut back: Vec<Window> = Vec::new();
        for s in &segs[..2] {
            let u = reg.untrack(s.addr).unwrap();
            assert!(u.pass_hold.is_none());
            back.extend(u.windows.iter().map(|w| w.1));
        }
        let f = reg.forget(c).unwrap();
        back.extend(f.windows.iter().map(|h| h.window));
        drop(f);
        back.sort();
        assert_eq!(back, segs.iter().map(|s| s.seq * 100).collect::<Vec<_>>());
        let left: Vec<Segment> = reg.drain().iter().map(|u| u.segment).collect();
        assert_eq!(left, segs[2..]);
    }
}

/// A panic in one comm's callback leaves the other comms alone.
#[test]
fn panic_in_pass_all_stops_there() {
    let reg = Reg::new();
    let a = reg.track(0, 0x1000).unwrap();
    let c1 = reg.attach(1);
    let c2 = reg.attach(2);
    let r = catch_unwind(AssertUnwindSafe(|| {
        reg.register_pending_all(|c, _, _| {
            if c == c2 {
                panic!("boom in c2");
            }
            Ok::<_, ()>(Some(1))
        })
        .len()
    }));
    assert_eq!(
        r.expect_err("propagates").downcast_ref::<&str>(),
        Some(&"boom in c2")
    );
    assert_eq!((reg.pending(c1), reg.pending(c2)), (Ok(0), Ok(1)));
    let retry = reg
        .register_pending(c2, |_, _| Ok::<_, ()>(Some(2)))
        .unwrap();
    assert_eq!(retry.registered, vec![a]);
}

/// A panicking pass cannot return its report: what it owed (a free whose
/// last hold its finish released) goes to the comm's next `forget`. (Found
/// missing by the state machine before the registry parked orphans.)
#[test]
fn panic_after_untrack_in_callback_owes_its_free_to_forget() {
    let reg = Reg::new();
    let c = reg.attach(0);
    let a = reg.track(0x1000, 0x1000).unwrap();
    let r = catch_unwind(AssertUnwindSafe(|| {
        reg.register_pending(c, |_, s| {
            let u = reg.untrack(s.addr).unwrap();
            let hold = u.pass_hold.expect("the pass holds it");
            assert!(!hold.release(), "the pass still holds it");
            #[allow(unreachable_code)]
            {
                panic!("callback panics");
                Ok::<Option<Window>, ()>(None)
            }
        })
        .map(|r| r.free_now)
    }));
    assert!(r.is_err());
    let f = reg.forget(c).unwrap();
    assert_eq!(f.free_now, vec![a], "forget is told to free A");
    assert!(f.windows.is_empty() && !f.pass_running);
}

/// The same for a window: the callback on A untracks A and returns its
/// window (which the pass hands back), the callback on B panics; the next
/// pass on the comm hands the window back, with A's hold.
#[test]
fn panic_after_untrack_in_callback_owes_its_window_to_next_pass() {
    let reg = Reg::new();
    let c = reg.attach(0);
    let a = reg.track(0x1000, 0x1000).unwrap();
    let b = reg.track(0x3000, 0x1000).unwrap();
    let r = catch_unwind(AssertUnwindSafe(|| {
        reg.register_pending(c, |_, s| {
            if *s == a {
                let u = reg.untrack(s.addr).unwrap();
                assert!(u.windows.is_empty());
                assert!(!u.pass_hold.expect("held").release());
                return Ok::<_, ()>(Some(7u64));
            }
            panic!("callback panics on B")
        })
        .map(|r| r.handed_back.len())
    }));
    assert!(r.is_err());
    let next = reg
        .register_pending(c, |_, s| Ok::<_, ()>(Some(s.seq * 100)))
        .unwrap();
    assert_eq!(next.registered, vec![b], "resumes at B");
    let back: Vec<_> = next
        .handed_back
        .into_iter()
        .map(|h| (h.segment, h.window, h.hold.release()))
        .collect();
    assert_eq!(
        back,
        vec![(a, 7, true)],
        "A's window, and A's memory to free"
    );
}

/// Registry bug: the comm is forgotten inside the callback of a pass that
/// then panics. `forget` sees the pass running and leaves its orphans to
/// it; the pass parks them on the forgotten comm, where nobody will ever
/// take them: the window handed back for A is lost, and A's hold (kept
/// for that hand-back) is never released, so A is never freed or swept.
#[test]
fn panic_after_forget_in_callback_loses_no_window() {
    let reg = Reg::new();
    let c = reg.attach(0);
    let a = reg.track(0x1000, 0x1000).unwrap();
    reg.track(0x3000, 0x1000).unwrap();
    let mut forgotten = Vec::new();
    let r = catch_unwind(AssertUnwindSafe(|| {
        reg.register_pending(c, |_, s| {
            if *s == a {
                let u = reg.untrack(s.addr).unwrap();
                assert!(!u.pass_hold.expect("held").release());
                return Ok::<_, ()>(Some(7u64));
            }
            let f = reg.forget(c).unwrap();
            assert!(f.pass_running);
            forgotten.extend(f.windows.into_iter().map(|h| (h.window, h.hold.release())));
            forgotten.extend(f.free_now.iter().map(|s| (s.seq, true)));
            panic!("callback panics on B")
        })
        .map(|r| r.handed_back.len())
    }));
    assert!(r.is_err());
    // The comm is gone: what the pass owed is with the registry's orphans.
    assert!(
        forgotten.is_empty(),
        "the pass still held it when forget ran"
    );
    let orphans = reg.take_orphans();
    forgotten.extend(
        orphans
            .windows
            .into_iter()
            .map(|h| (h.window, h.hold.release())),
    );
    forgotten.extend(orphans.free_now.iter().map(|s| (s.seq, true)));
    assert_eq!(forgotten, vec![(7, true)], "window 7 of A, with A's free");
    assert!(reg.take_orphans().windows.is_empty(), "handed back once");
}
