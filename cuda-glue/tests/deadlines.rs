//! Deadlines on the comm's own calls, with simulated ranks on threads: a
//! registration that never completes ends at the deadline with `Timeout`
//! where the glue may abort the comm (owned, or borrowed non-blocking with
//! the owner's hook); the comm is then `Aborted`, every window it had
//! leaves the accounting without an NCCL call (wherever it was), each
//! segment is still freed once, and its raw handle is no longer attached.
//! A borrowed blocking comm is never aborted: the watchdog reports the
//! stall. Negative control: the same runs with the deadline ignored hang,
//! and the harness's watchdog says so (bounded; it releases the calls).
#![cfg(not(feature = "loom"))]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::ranks::{assert_exact, Ranks};
use common::{assert_clean, park_register, MIB};
use segment_registry_nccl::sim::{SimBackend, SimCall, SimOp, SimWorld};
use segment_registry_nccl::{
    Allocator, AttachOptions, Backend, CommId, CommState, RawComm, RegisterError, TestFaults,
    WindowError,
};

const DEADLINE: Duration = Duration::from_millis(100);

/// One simulated rank and its allocator with an owned non-blocking comm
/// attached with [`DEADLINE`].
fn owned_one_rank() -> (Arc<SimWorld>, RawComm, Allocator<SimBackend>, CommId) {
    let world = SimWorld::new(1);
    let raw = world.comm_create_nonblocking(&[0]).unwrap()[0];
    let al = Allocator::new(world.rank(0).unwrap());
    let id = al
        .attach_with(raw, AttachOptions::new().owned().deadline(DEADLINE))
        .unwrap();
    (world, raw, al, id)
}

/// The property: on an owned non-blocking comm, a registration whose
/// rendezvous never completes ends at the deadline with `Timeout` on every
/// rank; the comm is aborted, its two windows dropped, its handle gone;
/// every segment is freed once; a new comm at a reused handle attaches.
fn a_lost_registration_ends_at_the_deadline(faults: TestFaults) -> Result<(), String> {
    let opts = AttachOptions::new().owned().deadline(DEADLINE);
    let mut job = Ranks::with(2, true, opts, faults);
    job.watchdog = DEADLINE * 20;
    job.run(|_, a, id| {
        for _ in 0..2 {
            a.alloc(2 * MIB, 0).unwrap();
        }
        assert_eq!(a.register(id).unwrap().windows, 2);
    })
    .unwrap();
    for &raw in &job.raws {
        job.world.stall_next(raw, SimOp::Register).unwrap();
    }
    let got = job
        .run(|_, a, id| {
            a.alloc(2 * MIB, 0).unwrap();
            a.register(id)
        })
        .map_err(|e| format!("stalled pass: {e}"))?;
    for (r, p) in got.iter().enumerate() {
        match p {
            Err(RegisterError::Timeout { call, waited, .. })
                if *call == "ncclCommWindowRegister" && *waited >= DEADLINE => {}
            other => return Err(format!("rank {r}: expected Timeout, got {other:?}")),
        }
    }
    for (r, a) in job.allocs.iter().enumerate() {
        let s = a.stats();
        let c = &s.comms[0];
        assert_eq!(c.state, CommState::Aborted, "rank {r}");
        assert_eq!(
            (
                s.timeouts,
                s.comms_aborted,
                s.windows_dropped,
                s.windows_deregistered
            ),
            (1, 1, 2, 0),
            "rank {r}: {s:?}"
        );
        assert!(a
            .last_async_error()
            .unwrap()
            .contains("the comm was aborted"));
        // The handle is no longer attached; the id answers Aborted.
        assert_eq!(a.comm_id(job.raws[r]), None);
        let seg = a
            .find(0)
            .map_or(0x7f00_0000_0000 + r * 0x20_0000_0000, |s| s.addr);
        assert!(matches!(
            a.window_of_raw(job.raws[r], seg, 1),
            Err(WindowError::UnknownComm(_))
        ));
        assert!(matches!(
            a.register(job.ids[r]),
            Err(RegisterError::Aborted { .. })
        ));
    }
    let s = job.world.stats();
    assert_eq!((s.aborts, s.windows_aborted), (2, 4), "{s:?}");
    // NCCL reuses a freed comm's address: a new comm there attaches.
    let fresh = job.world.comm_create(&[0, 1]).unwrap();
    for (r, &raw) in fresh.iter().enumerate() {
        let id = job.allocs[r].attach(raw).unwrap();
        job.allocs[r].detach(id).unwrap();
        job.world.comm_destroy(raw).unwrap();
    }
    job.finish();
    Ok(())
}

#[test]
fn a_lost_registration_ends_at_the_deadline_with_timeout_and_the_comm_is_aborted() {
    a_lost_registration_ends_at_the_deadline(TestFaults::default()).unwrap();
}

#[test]
fn control_an_ignored_deadline_hangs_the_lost_registration() {
    let faults = TestFaults {
        ignore_deadline: true,
        ..TestFaults::default()
    };
    let e = a_lost_registration_ends_at_the_deadline(faults).unwrap_err();
    assert!(e.contains("stalled pass: ranks [0, 1] still waited"), "{e}");
}

/// One rank, an owned comm with windows everywhere the accounting keeps
/// them when the registration of `s3` reaches its deadline: `s1`
/// registered and freed during the stalled call (queued in the gate),
/// `s2` freed earlier with a failed deregistration (stuck for a retry),
/// `s4` registered by the same pass and freed while the pass held it
/// (handed back). All three leave without an NCCL call; all four segments
/// are freed once.
#[test]
fn queued_stuck_and_handed_back_windows_of_an_aborted_comm_are_dropped_once() {
    let (world, _, al, id) = owned_one_rank();
    let s1 = al.alloc(2 * MIB, 0).unwrap();
    let s2 = al.alloc(2 * MIB, 0).unwrap();
    assert_eq!(al.register(id).unwrap().windows, 2);
    world.fail_nth(0, SimOp::Deregister, 1);
    al.free(s2).unwrap();
    assert_eq!(al.stats().windows_stuck, 1, "s2's deregistration failed");
    let s4 = al.alloc(2 * MIB, 0).unwrap();
    let s3 = al.alloc(2 * MIB, 0).unwrap();
    // While s4 registers, the test arms a stall of the next registration
    // (s3's) and frees s4, which the pass holds. While s3's registration
    // is in flight (stalled), it frees s1, whose deregistration queues
    // behind that call. The pass's retry of s2 comes first and fails again
    // (the fault is armed once more).
    world.fail_nth(0, SimOp::Deregister, 1);
    let (entered_tx, entered) = mpsc::channel();
    let (go, go_rx) = mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let w2 = world.clone();
    world.set_hook(Some(Arc::new(move |c: &SimCall| {
        if c.op == SimOp::Register && (c.ptr == s4 || c.ptr == s3) {
            if c.ptr == s4 {
                w2.stall_next(c.comm, SimOp::Register).unwrap();
            }
            entered_tx.send(c.ptr).unwrap();
            let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(10));
        }
    })));
    let outcome = thread::scope(|s| {
        let pass = s.spawn(|| al.register(id));
        let ten = Duration::from_secs(10);
        assert_eq!(entered.recv_timeout(ten).unwrap(), s4);
        let f4 = al.free(s4).unwrap();
        assert!(f4.held_by_pass, "{f4:?}");
        go.send(()).unwrap();
        assert_eq!(entered.recv_timeout(ten).unwrap(), s3);
        let f1 = al.free(s1).unwrap();
        assert_eq!(f1.deferred, 1, "{f1:?}");
        go.send(()).unwrap();
        pass.join().unwrap()
    });
    world.set_hook(None);
    assert!(
        matches!(outcome, Err(RegisterError::Timeout { .. })),
        "{outcome:?}"
    );
    let st = al.stats();
    assert_eq!(st.comms[0].state, CommState::Aborted);
    assert_eq!(
        (
            st.windows_registered,
            st.windows_deregistered,
            st.windows_dropped
        ),
        (3, 0, 3),
        "s1, s2, s4 registered; none deregistered; all three dropped: {st:?}"
    );
    al.free(s3).unwrap();
    assert_exact(0, &al);
    assert_eq!(st.windows_stuck, 0);
    al.detach(id).unwrap();
    // No deregistration after the abort (a use after free in NCCL; the
    // simulator would also report a call on the aborted handle).
    let trace = world.trace();
    let abort = common::position(&trace, |e| e.op == SimOp::Abort);
    assert!(
        trace[abort..].iter().all(|e| e.op != SimOp::Deregister),
        "{:#?}",
        &trace[abort..]
    );
    assert_eq!(world.stats().windows_aborted, 3);
    assert_clean(&world);
}

#[test]
fn a_detach_whose_deregistration_reaches_its_deadline_drops_what_it_holds() {
    let (world, raw, al, id) = owned_one_rank();
    for _ in 0..3 {
        al.alloc(2 * MIB, 0).unwrap();
    }
    assert_eq!(al.register(id).unwrap().windows, 3);
    world.stall_next(raw, SimOp::Deregister).unwrap();
    let d = al.detach(id).unwrap();
    assert_eq!(d.deregistered, 0, "{d:?}");
    let s = al.stats();
    assert_eq!((s.comms_aborted, s.windows_dropped), (1, 3), "{s:?}");
    assert!(s.comms.is_empty(), "detached");
    al.free_all();
    assert_exact(0, &al);
    assert_clean(&world);
}

#[test]
fn a_borrowed_non_blocking_comm_is_aborted_through_its_owners_hook() {
    let world = SimWorld::new(1);
    let raw = world.comm_create_nonblocking(&[0]).unwrap()[0];
    let calls = Arc::new(AtomicUsize::new(0));
    let (w2, c2) = (world.clone(), calls.clone());
    let hook = Arc::new(move |comm| {
        c2.fetch_add(1, Ordering::SeqCst);
        w2.rank(0)
            .unwrap()
            .comm_abort(comm)
            .map_err(|e| e.to_string())
    });
    let al = Allocator::new(world.rank(0).unwrap());
    let opts = AttachOptions::new()
        .borrowed_nonblocking(hook)
        .deadline(DEADLINE);
    let id = al.attach_with(raw, opts).unwrap();
    al.alloc(2 * MIB, 0).unwrap();
    world.stall_next(raw, SimOp::Register).unwrap();
    let r = al.register(id);
    assert!(matches!(r, Err(RegisterError::Timeout { .. })), "{r:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the hook ran once");
    assert_eq!(al.stats().comms[0].state, CommState::Aborted);
    al.detach(id).unwrap();
    al.free_all();
    assert_exact(0, &al);
    assert_clean(&world);
}

#[test]
fn a_failing_abort_hook_is_reported_and_the_call_goes_on_waiting() {
    let world = SimWorld::new(1);
    let raw = world.comm_create_nonblocking(&[0]).unwrap()[0];
    let hook = Arc::new(|_| Err("the owner refuses".to_string()));
    let al = Allocator::new(world.rank(0).unwrap());
    let opts = AttachOptions::new()
        .borrowed_nonblocking(hook)
        .deadline(DEADLINE);
    let id = al.attach_with(raw, opts).unwrap();
    al.alloc(2 * MIB, 0).unwrap();
    world.stall_next(raw, SimOp::Register).unwrap();
    thread::scope(|s| {
        let pass = s.spawn(|| al.register(id));
        let start = Instant::now();
        while al.stats().stalls == 0 && start.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(5));
        }
        assert!(!pass.is_finished(), "the call goes on waiting");
        world.release_all();
        assert!(matches!(
            pass.join().unwrap(),
            Err(RegisterError::Register { .. })
        ));
    });
    let msg = al.last_async_error().unwrap();
    assert!(
        msg.contains("abort hook failed (the owner refuses)"),
        "{msg}"
    );
    assert_eq!(al.stats().comms[0].state, CommState::Failed);
    assert_eq!(world.stats().aborts, 0);
}

#[test]
fn a_blocking_borrowed_comm_is_never_aborted_and_the_watchdog_reports_the_stall() {
    let world = SimWorld::new(1);
    let raw = world.comm_create(&[0]).unwrap()[0];
    let al = Allocator::new(world.rank(0).unwrap());
    let id = al
        .attach_with(
            raw,
            AttachOptions::new().deadline(Duration::from_millis(30)),
        )
        .unwrap();
    al.alloc(2 * MIB, 0).unwrap();
    world.stall_next(raw, SimOp::Register).unwrap();
    thread::scope(|s| {
        let pass = s.spawn(|| al.register(id));
        let start = Instant::now();
        while al.stats().stalls == 0 && start.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(5));
        }
        let msg = al.last_async_error().unwrap_or_default();
        assert!(
            msg.contains(&format!("ncclCommWindowRegister on {id}"))
                && msg.contains("has waited")
                && msg.contains("nothing can end the call safely"),
            "{msg}"
        );
        assert!(!pass.is_finished(), "nothing ended the call");
        world.release_all(); // the test's escape hatch, not the glue's
        let r = pass.join().unwrap();
        assert!(matches!(r, Err(RegisterError::Register { .. })), "{r:?}");
    });
    let s = al.stats();
    assert_eq!((s.stalls, s.timeouts, s.comms_aborted), (1, 0, 0), "{s:?}");
    assert_eq!(
        world.stats().aborts,
        0,
        "a borrowed blocking comm is never aborted"
    );
    assert!(world.verify().is_empty(), "{:?}", world.verify());
}

#[test]
fn a_checked_comm_whose_registration_times_out_loses_its_agreement_comm_too() {
    let opts = AttachOptions::new().checked().owned().deadline(DEADLINE);
    let job = Ranks::with(2, true, opts, TestFaults::default());
    for &raw in &job.raws {
        job.world.stall_next(raw, SimOp::Register).unwrap();
    }
    let got = job
        .run(|_, a, id| {
            a.alloc(2 * MIB, 0).unwrap();
            a.register(id)
        })
        .unwrap();
    assert!(got
        .iter()
        .all(|p| matches!(p, Err(RegisterError::Timeout { .. }))));
    // Two comm aborts and two agreement-comm aborts.
    assert_eq!(job.world.stats().aborts, 4);
    job.finish();
}

/// A free whose deregistration reaches its deadline aborts the owned comm:
/// the window is dropped (NCCL freed it inside the abort), not kept for a
/// retry, and the memory is freed at once.
#[test]
fn a_free_whose_deregistration_reaches_its_deadline_drops_the_window_and_frees() {
    let (world, raw, al, id) = owned_one_rank();
    let p = al.alloc(2 * MIB, 0).unwrap();
    assert_eq!(al.register(id).unwrap().windows, 1);
    assert!(al.stats().comms[0].abortable, "owned");
    world.stall_next(raw, SimOp::Deregister).unwrap();
    al.free(p).unwrap();
    let s = al.stats();
    assert_eq!(
        (
            s.comms_aborted,
            s.windows_dropped,
            s.deregister_failures,
            s.mem_frees
        ),
        (1, 1, 0, 1),
        "{s:?}"
    );
    assert_eq!(s.comms[0].stuck, 0, "nothing left to retry");
    al.detach(id).unwrap();
    assert_exact(0, &al);
    assert_clean(&world);
}

/// A free made while a pass's registration is in flight leaves its
/// deregistration to the pass's thread; when that deregistration reaches
/// its deadline the comm is aborted, the pass makes no further
/// registration and answers `Aborted` (the comm is gone), not a failed
/// registration.
#[test]
fn a_pass_whose_comm_a_queued_deregistration_aborted_answers_aborted() {
    let (world, raw, al, id) = owned_one_rank();
    let a = al.alloc(2 * MIB, 0).unwrap();
    assert_eq!(al.register(id).unwrap().windows, 1);
    let b = al.alloc(2 * MIB, 0).unwrap();
    al.alloc(2 * MIB, 0).unwrap();
    let park = park_register(&world, 0, b);
    thread::scope(|s| {
        let _unpark = park.unpark_on_panic();
        let pass = s.spawn(|| al.register(id));
        park.entered();
        al.free(a).unwrap();
        assert_eq!(al.stats().comms[0].queued, 1, "left to the pass");
        world.stall_next(raw, SimOp::Deregister).unwrap();
        park.release();
        let e = pass.join().unwrap().unwrap_err();
        assert!(matches!(e, RegisterError::Aborted { .. }), "{e:?}");
    });
    world.set_hook(None);
    let registers = world.stats().registers;
    assert_eq!(registers, 2, "a's and b's; none after the abort");
    assert_eq!(al.stats().comms[0].state, CommState::Aborted);
    al.detach(id).unwrap();
    al.free_all();
    assert_exact(0, &al);
    assert_clean(&world);
}
