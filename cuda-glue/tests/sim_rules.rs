//! The simulated NCCL catches every rule breach it claims to, and nothing
//! in a clean program.
#![cfg(not(feature = "loom"))]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use segment_registry_nccl::sim::{set_alloc_site, Mismatch, SimCall, SimOp, SimWorld, Violation};
use segment_registry_nccl::{Backend, BackendError, RawComm, NCCL_WIN_COLL_SYMMETRIC};

const MIB: usize = 1 << 20;
const F: i32 = NCCL_WIN_COLL_SYMMETRIC;

fn kinds(w: &SimWorld) -> Vec<&'static str> {
    w.violations().iter().map(|v| v.kind()).collect()
}

#[test]
fn clean_two_rank_program_has_no_violations() {
    let w = SimWorld::new(2);
    let c = w.comm_create(&[0, 1]).unwrap();
    for (r, &comm) in c.iter().enumerate() {
        let b = w.rank(r).unwrap();
        let p = b.mem_alloc(4 * MIB, 0).unwrap();
        let win = b
            .comm_window_register(comm, p, 4 * MIB, F)
            .unwrap()
            .unwrap();
        b.comm_window_deregister(comm, win).unwrap();
        b.mem_free(p).unwrap();
        w.comm_destroy(comm).unwrap();
    }
    assert!(w.verify().is_empty(), "{:?}", w.violations());
    let s = w.stats();
    assert_eq!((s.live_allocs, s.live_windows, s.live_comms), (0, 0, 0));
    assert_eq!((s.windows_issued, s.windows_deregistered), (2, 2));
}

#[test]
fn ranks_have_distinct_address_spaces_and_freed_ranges_are_reused() {
    let w = SimWorld::new(2);
    let (b0, b1) = (w.rank(0).unwrap(), w.rank(1).unwrap());
    let p0 = b0.mem_alloc(3 * MIB, 0).unwrap();
    let p1 = b1.mem_alloc(3 * MIB, 0).unwrap();
    assert!(p1 > p0, "rank 1's space lies above rank 0's");
    assert_eq!(p0 % (2 * MIB), 0);
    let q0 = b0.mem_alloc(MIB, 0).unwrap();
    assert_eq!(q0, p0 + 4 * MIB, "3 MiB rounds up to two 2 MiB granules");
    b0.mem_free(p0).unwrap();
    assert_eq!(
        b0.mem_alloc(2 * MIB, 0).unwrap(),
        p0,
        "first fit reuses the freed range"
    );
    assert!(w.rank(2).is_none());
}

/// A rank's simulated memory holds 64 GiB: all of it in one allocation,
/// and then nothing more.
#[test]
fn a_rank_can_allocate_its_whole_memory_and_then_no_more() {
    let w = SimWorld::new(1);
    let b = w.rank(0).unwrap();
    let all = b
        .mem_alloc(64 << 30, 0)
        .expect("the whole capacity at once");
    let e = b.mem_alloc(2 * MIB, 0).unwrap_err();
    assert!(e.to_string().contains("out of memory"), "{e}");
    assert!(
        b.mem_alloc((64 << 30) + 1, 0).is_err(),
        "more than the capacity"
    );
    b.mem_free(all).unwrap();
    b.mem_free(b.mem_alloc(2 * MIB, 0).unwrap()).unwrap();
    assert!(w.verify().is_empty(), "{:?}", w.verify());
}

#[test]
fn collective_size_mismatch_is_reported() {
    let w = SimWorld::new(2);
    let c = w.comm_create(&[0, 1]).unwrap();
    let (b0, b1) = (w.rank(0).unwrap(), w.rank(1).unwrap());
    let p0 = b0.mem_alloc(2 * MIB, 0).unwrap();
    let p1 = b1.mem_alloc(4 * MIB, 0).unwrap();
    b0.comm_window_register(c[0], p0, 2 * MIB, F).unwrap();
    b1.comm_window_register(c[1], p1, 4 * MIB, F).unwrap();
    let v = w.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(matches!(
        &v[0],
        Violation::CollectiveMismatch {
            index: 0,
            ranks: (0, 1),
            what: Mismatch::Size { first, other },
            ..
        } if *first == 2 * MIB && *other == 4 * MIB
    ));
}

#[test]
fn collective_order_mismatch_is_reported_by_buffer_identity() {
    let w = SimWorld::new(2);
    let c = w.comm_create(&[0, 1]).unwrap();
    let mut bufs = Vec::new();
    for r in 0..2 {
        let b = w.rank(r).unwrap();
        set_alloc_site(Some("x"));
        let x = b.mem_alloc(2 * MIB, 0).unwrap();
        set_alloc_site(Some("y"));
        let y = b.mem_alloc(2 * MIB, 0).unwrap();
        set_alloc_site(None);
        bufs.push((b, x, y));
    }
    // Rank 0 registers x then y; rank 1 y then x: same sizes, wrong order.
    let (b0, x0, y0) = &bufs[0];
    b0.comm_window_register(c[0], *x0, 2 * MIB, F).unwrap();
    b0.comm_window_register(c[0], *y0, 2 * MIB, F).unwrap();
    let (b1, x1, y1) = &bufs[1];
    b1.comm_window_register(c[1], *y1, 2 * MIB, F).unwrap();
    b1.comm_window_register(c[1], *x1, 2 * MIB, F).unwrap();
    assert_eq!(kinds(&w), vec!["collective-order", "collective-order"]);
    match &w.violations()[0] {
        Violation::CollectiveMismatch {
            what: Mismatch::Order { first, other },
            ..
        } => {
            assert_eq!(first.as_ref().unwrap().to_string(), "x#1");
            assert_eq!(other.as_ref().unwrap().to_string(), "y#1");
        }
        v => panic!("unexpected {v:?}"),
    }
}

#[test]
fn collective_count_mismatch_is_reported_by_verify_and_destroy() {
    let w = SimWorld::new(2);
    let c = w.comm_create(&[0, 1]).unwrap();
    let b0 = w.rank(0).unwrap();
    let p = b0.mem_alloc(2 * MIB, 0).unwrap();
    let win = b0
        .comm_window_register(c[0], p, 2 * MIB, F)
        .unwrap()
        .unwrap();
    assert!(w.violations().is_empty(), "not checked until the end");
    let cid = w.comm_id(c[0]).unwrap();
    assert_eq!(w.registration_counts(cid), vec![(0, 1), (1, 0)]);
    let v = w.verify();
    assert_eq!(
        v,
        vec![Violation::CollectiveCountMismatch {
            comm: cid,
            counts: vec![(0, 1), (1, 0)]
        }]
    );
    // Reported once, also when the comm goes away.
    b0.comm_window_deregister(c[0], win).unwrap();
    w.comm_destroy(c[0]).unwrap();
    w.comm_destroy(c[1]).unwrap();
    assert_eq!(w.verify().len(), 1);

    // And at destroy, when nobody called verify.
    let w = SimWorld::new(2);
    let c = w.comm_create(&[0, 1]).unwrap();
    let b1 = w.rank(1).unwrap();
    let p = b1.mem_alloc(2 * MIB, 0).unwrap();
    let win = b1
        .comm_window_register(c[1], p, 2 * MIB, F)
        .unwrap()
        .unwrap();
    b1.comm_window_deregister(c[1], win).unwrap();
    w.comm_destroy(c[0]).unwrap();
    w.comm_destroy(c[1]).unwrap();
    assert_eq!(kinds(&w), vec!["collective-count"]);
}

/// Parks the first call of `op` on rank 0 inside the hook until released.
fn park_first(w: &SimWorld, op: SimOp) -> (Arc<Barrier>, Arc<Barrier>) {
    let entered = Arc::new(Barrier::new(2));
    let release = Arc::new(Barrier::new(2));
    let (e, r) = (entered.clone(), release.clone());
    let armed = AtomicBool::new(true);
    w.set_hook(Some(Arc::new(move |call: &SimCall| {
        if call.op == op && call.rank == 0 && armed.swap(false, Ordering::SeqCst) {
            e.wait();
            r.wait();
        }
    })));
    (entered, release)
}

#[test]
fn two_calls_in_flight_on_one_comm_are_reported_but_not_across_comms() {
    let w = SimWorld::new(1);
    let c = w.comm_create(&[0]).unwrap()[0];
    let d = w.comm_create(&[0]).unwrap()[0];
    let b = w.rank(0).unwrap();
    let p = b.mem_alloc(2 * MIB, 0).unwrap();
    let q = b.mem_alloc(2 * MIB, 0).unwrap();
    let wq = b.comm_window_register(c, q, 2 * MIB, F).unwrap().unwrap();
    let wd = b.comm_window_register(d, q, 2 * MIB, F).unwrap().unwrap();
    let (entered, release) = park_first(&w, SimOp::Register);
    let t = {
        let b = b.clone();
        thread::spawn(move || b.comm_window_register(c, p, 2 * MIB, F))
    };
    entered.wait();
    // Another comm: fine (NCCL is reentrant across comms).
    b.comm_window_deregister(d, wd).unwrap();
    assert!(w.violations().is_empty(), "{:?}", w.violations());
    // The same comm: a violation.
    b.comm_window_deregister(c, wq).unwrap();
    release.wait();
    t.join().unwrap().unwrap();
    let v = w.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(matches!(
        v[0],
        Violation::ConcurrentCalls {
            rank: 0,
            first: "ncclCommWindowRegister",
            second: "ncclCommWindowDeregister",
            ..
        }
    ));
}

#[test]
fn freeing_memory_under_a_window_is_reported() {
    let w = SimWorld::new(1);
    let c = w.comm_create(&[0]).unwrap()[0];
    let b = w.rank(0).unwrap();
    let p = b.mem_alloc(2 * MIB, 0).unwrap();
    let win = b.comm_window_register(c, p, 2 * MIB, F).unwrap().unwrap();
    b.mem_free(p).unwrap(); // NCCL says success and keeps the window
    assert_eq!(
        w.violations(),
        vec![Violation::FreedWhileRegistered {
            rank: 0,
            ptr: p,
            window: win
        }]
    );
}

#[test]
fn freeing_memory_during_its_registration_is_reported() {
    let w = SimWorld::new(1);
    let c = w.comm_create(&[0]).unwrap()[0];
    let b = w.rank(0).unwrap();
    let p = b.mem_alloc(2 * MIB, 0).unwrap();
    let (entered, release) = park_first(&w, SimOp::Register);
    let t = {
        let b = b.clone();
        thread::spawn(move || b.comm_window_register(c, p, 2 * MIB, F))
    };
    entered.wait();
    b.mem_free(p).unwrap();
    release.wait();
    t.join().unwrap().unwrap();
    assert!(
        kinds(&w).contains(&"freed-during-registration"),
        "{:?}",
        kinds(&w)
    );
}

/// A comm destroyed while a registration on it is in flight: the destroy
/// is a second call on the comm, and the registration, checked before the
/// destroy, issues no window for the dead comm (nobody could deregister
/// it, and a comm made meanwhile gets the same handle value).
#[test]
fn destroying_a_comm_during_its_registration_is_reported_and_issues_no_window() {
    // Two ranks: rank 1's member keeps the comm alive after rank 0's goes.
    let w = SimWorld::new(2);
    let c = w.comm_create(&[0, 1]).unwrap()[0];
    let b = w.rank(0).unwrap();
    let p = b.mem_alloc(2 * MIB, 0).unwrap();
    let (entered, release) = park_first(&w, SimOp::Register);
    let t = {
        let b = b.clone();
        thread::spawn(move || b.comm_window_register(c, p, 2 * MIB, F))
    };
    entered.wait();
    w.comm_destroy(c).unwrap();
    let again = w.comm_create(&[0]).unwrap()[0];
    assert_eq!(again, c, "the handle value comes back");
    release.wait();
    let r = t.join().unwrap();
    assert_eq!(
        (
            r.is_err(),
            w.stats().live_windows,
            w.windows_on(again),
            kinds(&w)
        ),
        (true, 0, vec![], vec!["concurrent-calls"]),
        "register's result: {r:?}"
    );
}

/// The same for a deregistration: the destroy is reported as a second
/// call (and drops the window), not the late deregistration as a double
/// one.
#[test]
fn destroying_a_comm_during_a_deregistration_is_reported_as_concurrent() {
    let w = SimWorld::new(1);
    let c = w.comm_create(&[0]).unwrap()[0];
    let b = w.rank(0).unwrap();
    let p = b.mem_alloc(2 * MIB, 0).unwrap();
    let win = b.comm_window_register(c, p, 2 * MIB, F).unwrap().unwrap();
    let (entered, release) = park_first(&w, SimOp::Deregister);
    let t = {
        let b = b.clone();
        thread::spawn(move || b.comm_window_deregister(c, win))
    };
    entered.wait();
    w.comm_destroy(c).unwrap();
    release.wait();
    let r = t.join().unwrap();
    assert_eq!(
        (r.is_err(), w.stats().live_windows, kinds(&w)),
        (true, 0, vec!["concurrent-calls", "destroy-with-windows"]),
        "deregister's result: {r:?}"
    );
}

#[test]
fn duplicate_registration_is_reported_and_gets_a_second_window() {
    let w = SimWorld::new(1);
    let c = w.comm_create(&[0]).unwrap()[0];
    let b = w.rank(0).unwrap();
    let p = b.mem_alloc(4 * MIB, 0).unwrap();
    let w1 = b.comm_window_register(c, p, 4 * MIB, F).unwrap().unwrap();
    // A sub-range counts too.
    let w2 = b
        .comm_window_register(c, p + 2 * MIB, 2 * MIB, F)
        .unwrap()
        .unwrap();
    assert_ne!(w1, w2);
    assert_eq!(
        w.violations(),
        vec![Violation::DuplicateRegistration {
            comm: w.comm_id(c).unwrap(),
            rank: 0,
            ptr: p + 2 * MIB,
            existing: w1
        }]
    );
    assert_eq!(w.windows_on(c), vec![w1, w2]);
}

#[test]
fn double_deregister_and_a_stale_reused_handle_are_reported() {
    let w = SimWorld::new(1);
    let c = w.comm_create(&[0]).unwrap()[0];
    let b = w.rank(0).unwrap();
    let p = b.mem_alloc(2 * MIB, 0).unwrap();
    let old = b.comm_window_register(c, p, 2 * MIB, F).unwrap().unwrap();
    b.comm_window_deregister(c, old).unwrap();
    assert!(b.comm_window_deregister(c, old).is_err());
    // NCCL reuses handle values: the next window has the same raw value
    // but a new generation, and the stale handle cannot touch it.
    let q = b.mem_alloc(2 * MIB, 0).unwrap();
    let new = b.comm_window_register(c, q, 2 * MIB, F).unwrap().unwrap();
    assert_eq!(new.raw, old.raw);
    assert_ne!(new.generation, old.generation);
    assert!(b.comm_window_deregister(c, old).is_err());
    assert_eq!(w.windows_on(c), vec![new], "the live window survives");
    assert_eq!(kinds(&w), vec!["double-deregister", "double-deregister"]);
}

#[test]
fn deregister_on_the_wrong_comm_is_reported() {
    let w = SimWorld::new(1);
    let c = w.comm_create(&[0]).unwrap()[0];
    let d = w.comm_create(&[0]).unwrap()[0];
    let b = w.rank(0).unwrap();
    let p = b.mem_alloc(2 * MIB, 0).unwrap();
    let win = b.comm_window_register(c, p, 2 * MIB, F).unwrap().unwrap();
    assert!(b.comm_window_deregister(d, win).is_err());
    assert!(matches!(
        w.violations()[..],
        [Violation::WrongComm { window, .. }] if window == win
    ));
    assert_eq!(w.windows_on(c), vec![win]);
}

#[test]
fn misalignment_null_comm_foreign_comm_and_unknown_buffers_are_refused() {
    let w = SimWorld::new(2);
    let c = w.comm_create(&[0, 1]).unwrap();
    let b = w.rank(0).unwrap();
    let p = b.mem_alloc(2 * MIB, 0).unwrap();
    let e = b.comm_window_register(c[0], p + 512, 4096, F).unwrap_err();
    assert!(matches!(e, BackendError::SimRejected { .. }));
    let e = b
        .comm_window_register(RawComm(0), p, 2 * MIB, F)
        .unwrap_err();
    assert!(matches!(e, BackendError::NullComm { .. }));
    assert!(b.comm_window_register(c[1], p, 2 * MIB, F).is_err());
    assert!(b.comm_window_register(c[0], 0x1000, 4096, F).is_err());
    assert!(b
        .comm_window_register(RawComm(0xdead_0000), p, 4096, F)
        .is_err());
    assert!(b.mem_free(p + 4096).is_err());
    assert_eq!(
        kinds(&w),
        vec![
            "misaligned",
            "null-comm",
            "foreign-comm",
            "unknown-buffer",
            "unknown-comm",
            "bad-free"
        ]
    );
    assert_eq!(w.stats().windows_issued, 0);
}

#[test]
fn comm_handles_are_reused_and_destroying_a_comm_with_windows_is_reported() {
    let w = SimWorld::new(1);
    let c = w.comm_create(&[0]).unwrap()[0];
    let id = w.comm_id(c).unwrap();
    let b = w.rank(0).unwrap();
    let p = b.mem_alloc(2 * MIB, 0).unwrap();
    b.comm_window_register(c, p, 2 * MIB, F).unwrap().unwrap();
    w.comm_destroy(c).unwrap();
    assert_eq!(
        w.violations(),
        vec![Violation::DestroyWithWindows {
            comm: id,
            rank: 0,
            windows: 1
        }]
    );
    assert!(w.comm_destroy(c).is_err(), "destroyed twice");
    let again = w.comm_create(&[0]).unwrap()[0];
    assert_eq!(
        again, c,
        "the raw value comes back, like an ncclComm_t address"
    );
    assert_ne!(w.comm_id(again).unwrap(), id);
    assert_eq!(w.stats().live_windows, 0);
}

#[test]
fn faults_fire_on_the_nth_call_of_the_rank_only() {
    let w = SimWorld::new(2);
    let c = w.comm_create(&[0, 1]).unwrap();
    let (b0, b1) = (w.rank(0).unwrap(), w.rank(1).unwrap());
    w.fail_nth(0, SimOp::MemAlloc, 2);
    b0.mem_alloc(2 * MIB, 0).unwrap();
    b1.mem_alloc(2 * MIB, 0).unwrap();
    let e = b0.mem_alloc(2 * MIB, 0).unwrap_err();
    assert_eq!(
        e,
        BackendError::Injected {
            call: "ncclMemAlloc",
            nth: 2,
            rank: 0
        }
    );
    let p = b0.mem_alloc(2 * MIB, 0).unwrap();
    w.fail_nth(0, SimOp::Register, 1);
    assert!(b0.comm_window_register(c[0], p, 2 * MIB, F).is_err());
    assert!(
        w.windows_on(c[0]).is_empty(),
        "a failed register holds no window"
    );
    let win = b0
        .comm_window_register(c[0], p, 2 * MIB, F)
        .unwrap()
        .unwrap();
    w.fail_nth(0, SimOp::Deregister, 1);
    assert!(b0.comm_window_deregister(c[0], win).is_err());
    assert_eq!(
        w.windows_on(c[0]),
        vec![win],
        "a failed deregister keeps it"
    );
    b0.comm_window_deregister(c[0], win).unwrap();
    w.fail_nth(0, SimOp::MemFree, 1);
    assert!(b0.mem_free(p).is_err());
    assert!(w.is_allocated(0, p));
    b0.mem_free(p).unwrap();
    assert!(w.violations().is_empty(), "{:?}", w.violations());
}

#[test]
fn a_comm_without_symmetric_support_returns_null_windows() {
    let w = SimWorld::new(1);
    let c = w.comm_create_without_symmetric(&[0]).unwrap()[0];
    let b = w.rank(0).unwrap();
    let p = b.mem_alloc(2 * MIB, 0).unwrap();
    assert_eq!(b.comm_window_register(c, p, 2 * MIB, F).unwrap(), None);
    b.mem_free(p).unwrap();
    assert!(w.verify().is_empty());
}

#[test]
fn bad_comm_creation_is_refused() {
    let w = SimWorld::new(2);
    assert!(w.comm_create(&[]).is_err());
    assert!(w.comm_create(&[0, 0]).is_err());
    assert!(w.comm_create(&[2]).is_err());
}

/// Freeing memory right next to a registration in flight (just below it,
/// or just above) is no violation: only a free that overlaps it is.
#[test]
fn a_free_next_to_a_registration_in_flight_is_no_violation() {
    for register_low in [true, false] {
        let w = SimWorld::new(1);
        let c = w.comm_create(&[0]).unwrap()[0];
        let b = w.rank(0).unwrap();
        let low = b.mem_alloc(2 * MIB, 0).unwrap();
        let high = b.mem_alloc(2 * MIB, 0).unwrap();
        assert_eq!(high, low + 2 * MIB, "adjacent");
        let (registered, freed) = if register_low {
            (low, high)
        } else {
            (high, low)
        };
        let (entered, release) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
        let (e, r) = (entered.clone(), release.clone());
        w.set_hook(Some(Arc::new(move |call: &SimCall| {
            if call.op == SimOp::Register && call.ptr == registered {
                e.wait();
                r.wait();
            }
        })));
        thread::scope(|s| {
            let t = s.spawn(|| b.comm_window_register(c, registered, 2 * MIB, F));
            entered.wait();
            b.mem_free(freed).unwrap();
            release.wait();
            let window = t.join().unwrap().unwrap().expect("a window");
            w.set_hook(None);
            b.comm_window_deregister(c, window).unwrap();
        });
        b.mem_free(registered).unwrap();
        w.comm_destroy(c).unwrap();
        assert!(w.verify().is_empty(), "{:?}", w.verify());
    }
}

/// A registration of zero bytes is refused (it holds no memory of an
/// allocation), and every register and deregister call counts, refused
/// ones included.
#[test]
fn a_zero_byte_registration_is_refused_and_every_call_counts() {
    let w = SimWorld::new(1);
    let c = w.comm_create(&[0]).unwrap()[0];
    let b = w.rank(0).unwrap();
    let p = b.mem_alloc(2 * MIB, 0).unwrap();
    assert!(matches!(
        b.comm_window_register(c, p, 0, F),
        Err(BackendError::SimRejected { .. })
    ));
    let win = b.comm_window_register(c, p, 2 * MIB, F).unwrap().unwrap();
    assert_eq!(w.stats().registers, 2);
    b.comm_window_deregister(c, win).unwrap();
    assert_eq!(w.stats().deregisters, 1);
    b.mem_free(p).unwrap();
    w.comm_destroy(c).unwrap();
}
