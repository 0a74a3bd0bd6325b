//! The simulated NCCL's blocking calls: ranks on threads meet in the
//! all-reduce and the split, an abort ends a member's call (and frees its
//! windows), a non-blocking comm's call ends at its deadline through the
//! deadline action, a blocking one cannot, and the injected stall never
//! completes. Every wait here is bounded: by a deadline, or by the test's
//! `release_all` from a watchdog.
#![cfg(not(feature = "loom"))]

use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use segment_registry_nccl::sim::{SimBackend, SimOp, SimWorld};
use segment_registry_nccl::{
    AtDeadline, Backend, BackendError, RawComm, Wait, NCCL_WIN_COLL_SYMMETRIC as F,
};

const MIB: usize = 1 << 20;
const SHORT: Duration = Duration::from_millis(60);

/// Runs `f(rank, backend)` on one thread per rank and returns the results
/// in rank order. If they are not all back within 10 s, releases every
/// waiting call and panics (a test never hangs).
fn on_ranks<T: Send + 'static>(
    world: &Arc<SimWorld>,
    f: impl Fn(usize, SimBackend) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let (tx, rx) = mpsc::channel();
    for r in 0..world.nranks() {
        let (f, tx, b) = (f.clone(), tx.clone(), world.rank(r).unwrap());
        thread::spawn(move || {
            let _ = tx.send((r, f(r, b)));
        });
    }
    drop(tx);
    let mut out: Vec<Option<T>> = (0..world.nranks()).map(|_| None).collect();
    for _ in 0..world.nranks() {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok((r, v)) => out[r] = Some(v),
            Err(_) => {
                world.release_all();
                panic!("a rank did not return within 10 s (released every call)");
            }
        }
    }
    out.into_iter().map(Option::unwrap).collect()
}

#[test]
fn ranks_on_threads_meet_in_the_all_reduce_and_get_the_max() {
    let world = SimWorld::new(3);
    let comm = world.comm_create_nonblocking(&[0, 1, 2]).unwrap();
    let got = on_ranks(&world, move |r, b| {
        b.all_reduce_setup(comm[r]).unwrap();
        let mut w = [r as u64, 10 - r as u64, 7];
        b.all_reduce_max_u64(comm[r], &mut w, &Wait::unbounded())
            .map(|()| w)
    });
    for w in got {
        assert_eq!(w.unwrap(), [2, 10, 7]);
    }
    assert_eq!(world.stats().all_reduces, 1);
    assert!(world.verify().is_empty(), "{:?}", world.verify());
}

#[test]
fn a_split_gives_each_rank_its_handle_of_a_non_blocking_child() {
    let world = SimWorld::new(2);
    let parent = world.comm_create(&[0, 1]).unwrap();
    let p = parent.clone();
    let children = on_ranks(&world, move |r, b| {
        let parent = &p;
        let child = b.comm_split(parent[r], &Wait::unbounded()).unwrap();
        let mut w = [r as u64 + 1];
        b.all_reduce_max_u64(child, &mut w, &Wait::unbounded())
            .unwrap();
        (child, w[0])
    });
    let (c0, c1) = (children[0].0, children[1].0);
    assert_ne!(c0, c1);
    assert_eq!((children[0].1, children[1].1), (2, 2));
    assert_eq!(world.comm_id(c0), world.comm_id(c1), "one child comm");
    assert_ne!(world.comm_id(c0), world.comm_id(parent[0]));
    assert_eq!(world.is_blocking(c0), Some(false));
    assert_eq!(world.is_blocking(parent[0]), Some(true));
    for (r, c) in [(0, c0), (1, c1)] {
        world
            .rank(r)
            .unwrap()
            .comm_release(c, &Wait::unbounded())
            .unwrap();
    }
    assert!(world.verify().is_empty(), "{:?}", world.verify());
}

/// The deadline action the allocator gives a comm it owns: abort it from
/// the polling thread.
fn abort_at_deadline(b: &SimBackend, comm: RawComm) -> impl Fn(Duration) -> AtDeadline + '_ {
    move |_| {
        b.comm_abort(comm).unwrap();
        AtDeadline::Aborted
    }
}

#[test]
fn a_lost_rendezvous_ends_at_the_deadline_by_an_abort_and_frees_the_windows() {
    let world = SimWorld::new(2);
    let comm = world.comm_create_nonblocking(&[0, 1]).unwrap();
    // Each rank registers one window, then the all-reduce never meets.
    let mut wins = Vec::new();
    for (r, &c) in comm.iter().enumerate() {
        let b = world.rank(r).unwrap();
        let p = b.mem_alloc(2 * MIB, 0).unwrap();
        wins.push(b.comm_window_register(c, p, 2 * MIB, F).unwrap());
        world.stall_next(c, SimOp::AllReduce).unwrap();
    }
    let c = comm.clone();
    let got = on_ranks(&world, move |r, b| {
        let comm = &c;
        let action = abort_at_deadline(&b, comm[r]);
        let wait = Wait::new(SHORT, &action);
        let mut w = [1u64];
        let e = b.all_reduce_max_u64(comm[r], &mut w, &wait).unwrap_err();
        (e, wait.aborted())
    });
    for (r, (e, aborted)) in got.into_iter().enumerate() {
        assert!(aborted, "rank {r}: the deadline action ran");
        match e {
            BackendError::Timeout {
                call,
                comm: c,
                waited,
            } => {
                assert_eq!((call, c), ("ncclAllReduce", comm[r]));
                assert!(waited >= SHORT, "{waited:?}");
            }
            other => panic!("rank {r}: {other:?}"),
        }
    }
    let s = world.stats();
    assert_eq!((s.aborts, s.windows_aborted, s.live_windows), (2, 2, 0));
    assert!(world.verify().is_empty(), "{:?}", world.verify());
    // NCCL freed the windows inside the abort: deregistering one now is a
    // use after free, which the simulator reports.
    let b0 = world.rank(0).unwrap();
    assert!(matches!(
        b0.comm_window_deregister(comm[0], wins[0].unwrap()),
        Err(BackendError::Aborted { .. })
    ));
    assert_eq!(world.verify()[0].kind(), "call-after-abort");
}

#[test]
fn a_peer_that_never_comes_leaves_the_others_to_their_deadline() {
    let world = SimWorld::new(3);
    let comm = world.comm_create_nonblocking(&[0, 1, 2]).unwrap();
    // Rank 2's all-reduce hangs (it never contributes).
    world.stall_next(comm[2], SimOp::AllReduce).unwrap();
    let got = on_ranks(&world, move |r, b| {
        let action = abort_at_deadline(&b, comm[r]);
        let wait = Wait::new(SHORT * (r as u32 + 1), &action);
        let mut w = [r as u64];
        b.all_reduce_max_u64(comm[r], &mut w, &wait)
    });
    for (r, e) in got.iter().enumerate() {
        assert!(
            matches!(e, Err(BackendError::Timeout { .. })),
            "rank {r}: {e:?}"
        );
    }
    // Rank 0 aborted first: that did not release ranks 1 and 2, which
    // ended at their own deadlines.
    assert_eq!(world.stats().aborts, 3);
    assert!(world.verify().is_empty(), "{:?}", world.verify());
}

#[test]
fn a_stalled_register_on_a_non_blocking_comm_ends_at_its_deadline() {
    let world = SimWorld::new(1);
    let comm = world.comm_create_nonblocking(&[0]).unwrap()[0];
    let b = world.rank(0).unwrap();
    let p = b.mem_alloc(2 * MIB, 0).unwrap();
    world.stall_next(comm, SimOp::Register).unwrap();
    let action = abort_at_deadline(&b, comm);
    let wait = Wait::new(SHORT, &action);
    let e = b
        .comm_window_register_within(comm, p, 2 * MIB, F, &wait)
        .unwrap_err();
    assert!(
        matches!(
            e,
            BackendError::Timeout {
                call: "ncclCommWindowRegister",
                ..
            }
        ),
        "{e:?}"
    );
    // Nothing was registered; the memory can go.
    b.mem_free(p).unwrap();
    let s = world.stats();
    assert_eq!((s.windows_issued, s.aborts, s.live_allocs), (0, 1, 0));
    assert!(world.verify().is_empty(), "{:?}", world.verify());
}

#[test]
fn a_blocking_comm_ignores_the_deadline_and_an_abort_under_its_call_is_reported() {
    let world = SimWorld::new(1);
    let comm = world.comm_create(&[0]).unwrap()[0];
    let b = world.rank(0).unwrap();
    let p = b.mem_alloc(2 * MIB, 0).unwrap();
    world.stall_next(comm, SimOp::Register).unwrap();
    let (tx, rx) = mpsc::channel();
    let b2 = b.clone();
    let t = thread::spawn(move || {
        let never = |_| -> AtDeadline { panic!("a blocking call cannot be polled") };
        let wait = Wait::new(Duration::from_millis(1), &never);
        let r = b2.comm_window_register_within(comm, p, 2 * MIB, F, &wait);
        tx.send(r).unwrap();
    });
    // Well past the deadline the call still waits: a blocking call is not
    // polled, so nothing but the comm's abort can end it.
    assert!(rx.recv_timeout(SHORT * 3).is_err(), "the call returned");
    b.comm_abort(comm).unwrap(); // what a watchdog must not do
    let r = rx.recv_timeout(Duration::from_secs(10));
    if r.is_err() {
        world.release_all();
    }
    t.join().unwrap();
    assert!(matches!(r, Ok(Err(BackendError::Aborted { .. }))), "{r:?}");
    let v = world.verify();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].kind(), "abort-during-call");
}

#[test]
fn a_deadline_that_keeps_waiting_waits_until_released() {
    let world = SimWorld::new(1);
    let comm = world.comm_create_nonblocking(&[0]).unwrap()[0];
    world.stall_next(comm, SimOp::AllReduce).unwrap();
    let w2 = world.clone();
    let t = thread::spawn(move || {
        let b = w2.rank(0).unwrap();
        let fired = std::sync::atomic::AtomicUsize::new(0);
        let report = |_| {
            fired.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            AtDeadline::KeepWaiting
        };
        let wait = Wait::new(Duration::from_millis(5), &report);
        let r = b.all_reduce_max_u64(comm, &mut [1], &wait);
        (r, fired.load(std::sync::atomic::Ordering::SeqCst))
    });
    thread::sleep(SHORT);
    assert!(!t.is_finished(), "kept waiting past the deadline");
    world.release_all();
    let (r, fired) = t.join().unwrap();
    assert_eq!(fired, 1, "the action runs once");
    assert!(matches!(r, Err(BackendError::SimRejected { .. })), "{r:?}");
}

#[test]
fn rendezvous_of_different_lengths_is_a_violation_and_an_error_for_all() {
    let world = SimWorld::new(2);
    let comm = world.comm_create_nonblocking(&[0, 1]).unwrap();
    let got = on_ranks(&world, move |r, b| {
        let mut w = vec![1u64; r + 1];
        b.all_reduce_max_u64(comm[r], &mut w, &Wait::unbounded())
    });
    assert!(got.iter().all(Result::is_err), "{got:?}");
    assert_eq!(world.verify()[0].kind(), "rendezvous-mismatch");
}

#[test]
fn nccl_2_30_accepts_different_sizes_in_one_registration() {
    let world = SimWorld::new(2);
    world.set_nccl_version(23007);
    let c = world.comm_create(&[0, 1]).unwrap();
    let (b0, b1) = (world.rank(0).unwrap(), world.rank(1).unwrap());
    assert_eq!(b0.nccl_version(), 23007);
    let (p0, p1) = (
        b0.mem_alloc(2 * MIB, 0).unwrap(),
        b1.mem_alloc(4 * MIB, 0).unwrap(),
    );
    let w0 = b0.comm_window_register(c[0], p0, 2 * MIB, F).unwrap();
    let w1 = b1.comm_window_register(c[1], p1, 4 * MIB, F).unwrap();
    b0.comm_window_deregister(c[0], w0.unwrap()).unwrap();
    b1.comm_window_deregister(c[1], w1.unwrap()).unwrap();
    assert!(world.verify().is_empty(), "{:?}", world.verify());
}

/// A blocking comm's all-reduce is not polled: a peer that never comes
/// keeps it waiting past any deadline, until the test releases it.
#[test]
fn a_blocking_all_reduce_waits_past_its_deadline_for_a_peer() {
    let world = SimWorld::new(2);
    let comm = world.comm_create(&[0, 1]).unwrap();
    let b0 = world.rank(0).unwrap();
    b0.all_reduce_setup(comm[0]).unwrap();
    let t = thread::spawn(move || {
        let wait = Wait::give_up_after(Duration::from_millis(5));
        b0.all_reduce_max_u64(comm[0], &mut [1], &wait)
    });
    thread::sleep(SHORT);
    assert!(!t.is_finished(), "a blocking call ended at its deadline");
    world.release_all();
    let r = t.join().unwrap();
    assert!(matches!(r, Err(BackendError::SimRejected { .. })), "{r:?}");
}

/// The simulated all-reduce takes 1 to 16 words, as the real one's buffer.
#[test]
fn the_simulated_all_reduce_takes_one_to_sixteen_words() {
    use segment_registry_nccl::MAX_AGREEMENT_WORDS;
    let world = SimWorld::new(1);
    let comm = world.comm_create(&[0]).unwrap()[0];
    let b = world.rank(0).unwrap();
    b.all_reduce_setup(comm).unwrap();
    let wait = Wait::unbounded();
    let mut full = [4u64; MAX_AGREEMENT_WORDS];
    b.all_reduce_max_u64(comm, &mut full, &wait).unwrap();
    assert_eq!(full, [4; MAX_AGREEMENT_WORDS]);
    let mut over = [4u64; MAX_AGREEMENT_WORDS + 1];
    for words in [&mut [][..], &mut over[..]] {
        assert!(matches!(
            b.all_reduce_max_u64(comm, words, &wait),
            Err(BackendError::InvalidArgument { .. })
        ));
    }
}

/// A rank that left an all-reduce at its deadline never completes it: a
/// peer that comes later waits to its own deadline instead of reducing
/// with the input of a rank that gave up.
#[test]
fn a_meeting_a_rank_left_at_its_deadline_never_completes() {
    let world = SimWorld::new(2);
    let comm = world.comm_create_nonblocking(&[0, 1]).unwrap();
    let (b0, b1) = (world.rank(0).unwrap(), world.rank(1).unwrap());
    b0.all_reduce_setup(comm[0]).unwrap();
    b1.all_reduce_setup(comm[1]).unwrap();
    let early = Wait::give_up_after(Duration::from_millis(5));
    let r0 = b0.all_reduce_max_u64(comm[0], &mut [1], &early);
    assert!(matches!(r0, Err(BackendError::Timeout { .. })), "{r0:?}");
    let r1 = b1.all_reduce_max_u64(comm[1], &mut [2], &Wait::give_up_after(SHORT));
    assert!(matches!(r1, Err(BackendError::Timeout { .. })), "{r1:?}");
    assert_eq!(world.stats().all_reduces, 0);
}

/// A completed meeting is dropped once every member took its share: the
/// simulator's memory stays flat over many collectives.
#[test]
fn completed_meetings_are_dropped_once_every_member_took_its_share() {
    let world = SimWorld::new(2);
    let comm = world.comm_create_nonblocking(&[0, 1]).unwrap();
    on_ranks(&world, move |r, b| {
        b.all_reduce_setup(comm[r]).unwrap();
        for i in 0..10u64 {
            let mut w = [i + r as u64];
            b.all_reduce_max_u64(comm[r], &mut w, &Wait::unbounded())
                .unwrap();
            assert_eq!(w, [i + 1]);
        }
    });
    let s = world.stats();
    assert_eq!((s.all_reduces, s.open_meetings), (10, 0));
}

/// A rank that registered and was then aborted leaves the ranks with
/// different registration counts; that says nothing once a member is
/// aborted, so it is not reported as a mismatch.
#[test]
fn registration_counts_of_a_comm_with_an_aborted_member_are_not_compared() {
    let world = SimWorld::new(2);
    let comm = world.comm_create_nonblocking(&[0, 1]).unwrap();
    let b0 = world.rank(0).unwrap();
    let p = b0.mem_alloc(2 * MIB, 0).unwrap();
    b0.comm_window_register(comm[0], p, 2 * MIB, F)
        .unwrap()
        .expect("a window");
    b0.comm_abort(comm[0]).unwrap();
    b0.mem_free(p).unwrap();
    world.comm_destroy(comm[1]).unwrap();
    let kinds: Vec<_> = world.verify().iter().map(|v| v.kind()).collect();
    assert!(!kinds.contains(&"collective-count"), "{kinds:?}");
}
