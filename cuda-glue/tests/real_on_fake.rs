//! The real backend (`RealBackend`, NCCL and the CUDA driver through
//! cudarc) on the fake CUDA/NCCL of `multi-gpu/fake/`, each test in a child
//! process whose `LD_LIBRARY_PATH` names the fake. The fake's controls make
//! the interleavings deterministic.
#![cfg(not(feature = "loom"))]

mod fake;

use std::thread;
use std::time::Duration;

use segment_registry_nccl::real::RealBackend;
use segment_registry_nccl::{
    Allocator, AtDeadline, Backend, BackendError, CommProgress, Wait, NCCL_WIN_COLL_SYMMETRIC,
};

const MIB: usize = 1 << 20;

/// A free and an alloc of the same address race: the alloc gets the block
/// back while the free is still inside `ncclMemFree`. Both allocations
/// must reach `ncclMemFree`, and the fake must hold nothing at the end.
#[test]
fn an_alloc_inside_a_free_of_its_address_loses_nothing() {
    if !fake::in_child("an_alloc_inside_a_free_of_its_address_loses_nothing") {
        return;
    }
    let backend = RealBackend::new().expect("the real backend on the fake library");
    let fake = fake::Controls::load();
    let al = Allocator::new(backend);
    let p = al.alloc(2 * MIB, 0).unwrap();
    fake.pause_next_free();
    thread::scope(|s| {
        let _resume = fake.resume_on_drop();
        let freeing = s.spawn(|| al.free(p));
        assert!(fake.wait_paused(10), "the free never reached ncclMemFree");
        // ncclMemFree has given the block back and has not returned.
        let q = al.alloc(2 * MIB, 0).expect("an alloc inside the free");
        assert_eq!(q, p, "the fake hands the block freed last back first");
        fake.resume_free();
        freeing.join().unwrap().unwrap();
        al.free(q).unwrap();
    });
    let s = al.stats();
    assert_eq!(
        (s.mem_frees, s.mem_free_failures, fake.outstanding()),
        (2, 0, (0, 0)),
        "ncclMemFree calls (done, refused by the backend), and the bytes and \
         blocks the fake still holds; last error: {:?}",
        al.last_async_error()
    );
}

/// The real backend's calls for checked comms and deadlines, on the fake's
/// non-blocking comms (every call answers `ncclInProgress`, so the polling
/// path runs): a non-blocking init, a split, the agreement's all-reduce,
/// a window registered and deregistered; then a stalled registration that
/// ends at its deadline by an abort from the polling thread, after which
/// no call touches the comm, and NCCL freed its window.
#[test]
fn non_blocking_calls_poll_and_a_stalled_one_ends_by_an_abort_at_its_deadline() {
    if !fake::in_child("non_blocking_calls_poll_and_a_stalled_one_ends_by_an_abort_at_its_deadline")
    {
        return;
    }
    let b = RealBackend::new().expect("the real backend on the fake library");
    let fake = fake::Controls::load();
    let parent = b
        .comm_init_one_rank_nonblocking(0, &Wait::unbounded())
        .expect("ncclCommInitRankConfig");
    let child = b
        .comm_split(parent, &Wait::unbounded())
        .expect("ncclCommSplit");
    assert_eq!(b.comm_async_error(child).unwrap(), CommProgress::Ready);
    b.all_reduce_setup(child).unwrap();
    let mut words = [3u64, u64::MAX, 0];
    // The copy back is still running for a few polls: the result is read
    // only once the stream says it is done.
    fake.stream_busy(3);
    b.all_reduce_max_u64(child, &mut words, &Wait::unbounded())
        .expect("ncclAllReduce uint64 max");
    assert_eq!(fake.stream_busy_left(), 0, "waited for the stream");
    assert_eq!(
        words,
        [3, u64::MAX, 0],
        "one rank: the max is its own words"
    );
    b.all_reduce_teardown(child);
    b.comm_release(child, &Wait::unbounded())
        .expect("finalize + destroy");
    assert_eq!(fake.comms_destroyed(), 1);

    let p = b.mem_alloc(2 * MIB, 0).unwrap();
    let q = b.mem_alloc(2 * MIB, 0).unwrap();
    let w = b
        .comm_window_register(parent, p, 2 * MIB, NCCL_WIN_COLL_SYMMETRIC)
        .unwrap()
        .expect("a window");
    b.comm_window_deregister(parent, w).unwrap();
    let kept = b
        .comm_window_register(parent, q, 2 * MIB, NCCL_WIN_COLL_SYMMETRIC)
        .unwrap();
    assert!(kept.is_some());

    fake.stall_next();
    let abort = |_| {
        b.comm_abort(parent).expect("ncclCommAbort");
        AtDeadline::Aborted
    };
    let wait = Wait::new(Duration::from_millis(50), &abort);
    let e = b
        .comm_window_register_within(parent, p, 2 * MIB, NCCL_WIN_COLL_SYMMETRIC, &wait)
        .unwrap_err();
    assert!(
        matches!(
            e,
            BackendError::Timeout {
                call: "ncclCommWindowRegister",
                ..
            }
        ),
        "{e}"
    );
    // One abort; no call after it; the window still registered on q was
    // freed by NCCL inside the abort.
    assert_eq!(fake.abort_stats(), (1, 0, 1));
    b.mem_free(p).unwrap();
    b.mem_free(q).unwrap();
    assert_eq!(fake.outstanding(), (0, 0));
}

/// The allocator on the real backend and the fake's non-blocking comms.
/// Comm A, checked: a checked attach (split, warm-up) and a checked pass of
/// one rank, then an agreement that never completes ends at its deadline
/// (its agreement comm aborted, A failed, its window kept). Comm B, owned
/// and unchecked: a registration that never completes ends at its deadline
/// with `Timeout`, B is aborted by the polling thread, NCCL freed its
/// window. No call touches an aborted comm; every segment is freed once.
#[test]
fn the_allocator_ends_stalled_calls_at_their_deadline_on_real_nccl_calls() {
    if !fake::in_child("the_allocator_ends_stalled_calls_at_their_deadline_on_real_nccl_calls") {
        return;
    }
    use segment_registry_nccl::{AttachOptions, CommState, RegisterError};
    let b = RealBackend::new().expect("the real backend on the fake library");
    let fake = fake::Controls::load();
    let (raw_a, raw_b) = (
        b.comm_init_one_rank_nonblocking(0, &Wait::unbounded())
            .unwrap(),
        b.comm_init_one_rank_nonblocking(0, &Wait::unbounded())
            .unwrap(),
    );
    let al = Allocator::new(b);
    let deadline = Duration::from_millis(100);
    let opts = AttachOptions::new().owned().deadline(deadline);
    let a = al.attach_with(raw_a, opts.clone().checked()).unwrap();
    let b_id = al.attach_with(raw_b, opts).unwrap();
    al.alloc(2 * MIB, 0).unwrap();
    assert_eq!(al.register(a).unwrap().windows, 1);
    assert_eq!(al.register(b_id).unwrap().windows, 1);
    al.alloc(2 * MIB, 0).unwrap();
    fake.stall_next(); // A's agreement
    let e = al.register(a).unwrap_err();
    assert!(
        matches!(
            &e,
            RegisterError::Agreement {
                source: BackendError::Timeout {
                    call: "ncclAllReduce",
                    ..
                },
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(fake.abort_stats(), (1, 0, 0), "the agreement comm only");
    fake.stall_next(); // B's registration
    let e = al.register(b_id).unwrap_err();
    assert!(matches!(e, RegisterError::Timeout { .. }), "{e}");
    assert_eq!(fake.abort_stats(), (2, 0, 1), "B, and its one window");
    let states: Vec<CommState> = al.stats().comms.iter().map(|c| c.state).collect();
    assert_eq!(states, [CommState::Failed, CommState::Aborted]);
    al.detach(a).unwrap(); // deregisters A's window
    al.detach(b_id).unwrap(); // no NCCL call
    al.free_all();
    let s = al.stats();
    assert_eq!(
        (
            s.mem_frees,
            s.windows_registered,
            s.windows_deregistered,
            s.windows_dropped
        ),
        (2, 2, 1, 1),
        "{s:?}"
    );
    assert_eq!(fake.abort_stats().1, 0, "no call after an abort");
    // SAFETY: A was made by this test, detached, used by nobody else.
    unsafe { al.backend().comm_destroy(raw_a) }.unwrap();
    assert_eq!(fake.outstanding(), (0, 0));
}

/// The C ABI's `segreg_init` picks the real backend where NCCL loads (here
/// the fake), says so by name, and its allocations reach `ncclMemAlloc`
/// and `ncclMemFree`.
#[test]
fn the_c_abi_initializes_on_the_real_backend() {
    if !fake::in_child("the_c_abi_initializes_on_the_real_backend") {
        return;
    }
    use segment_registry_nccl::capi::{segreg_alloc, segreg_backend, segreg_free, segreg_init};
    use std::ffi::CStr;
    let fake = fake::Controls::load();
    assert_eq!(segreg_init(), 0);
    let name = segreg_backend();
    assert!(!name.is_null());
    // SAFETY: a non-null answer of segreg_backend is a static C string.
    assert_eq!(unsafe { CStr::from_ptr(name) }.to_str(), Ok("nccl"));
    let p = segreg_alloc(2 * MIB, 0, std::ptr::null_mut());
    assert!(!p.is_null());
    assert_eq!(fake.outstanding().1, 1, "one block from ncclMemAlloc");
    segreg_free(p, 2 * MIB, 0, std::ptr::null_mut());
    assert_eq!(fake.outstanding(), (0, 0));
}

/// An NCCL older than 2.28 is refused by name; 2.28.0 itself is accepted.
#[test]
fn an_nccl_older_than_2_28_is_refused() {
    if !fake::in_child("an_nccl_older_than_2_28_is_refused") {
        return;
    }
    std::env::set_var("FAKE_NCCL_VERSION", "22799");
    let e = RealBackend::new().unwrap_err();
    assert_eq!(
        e,
        BackendError::NcclTooOld {
            found: 22799,
            required: 22800
        }
    );
    std::env::set_var("FAKE_NCCL_VERSION", "22800");
    let b = RealBackend::new().expect("2.28.0 is new enough");
    assert_eq!(b.nccl_version(), 22800);
    assert_eq!(format!("{b:?}"), "RealBackend { nccl_version: 22800, .. }");
}

/// NCCL's errors come back typed, with the call, the code, NCCL's words
/// for the code and, for a call on a comm, `ncclGetLastError`'s detail:
/// a comm init that fails (blocking and non-blocking), and a registration
/// on a comm after its abort (blocking and non-blocking).
#[test]
fn nccl_errors_come_back_with_the_call_the_code_and_nccl_s_words() {
    if !fake::in_child("nccl_errors_come_back_with_the_call_the_code_and_nccl_s_words") {
        return;
    }
    const SYSTEM_ERROR: i32 = 2;
    let b = RealBackend::new().expect("the real backend on the fake library");
    let fake = fake::Controls::load();
    fake.fail_next_init(SYSTEM_ERROR);
    assert_eq!(
        b.comm_init_one_rank_nonblocking(0, &Wait::unbounded()),
        Err(BackendError::Nccl {
            call: "ncclCommInitRankConfig",
            code: SYSTEM_ERROR,
            message: "fake: system error (a peer did not come)".into(),
        })
    );
    fake.fail_next_init(SYSTEM_ERROR);
    assert!(matches!(
        b.comm_init_one_rank(0),
        Err(BackendError::Nccl {
            call: "ncclCommInitRank",
            code: SYSTEM_ERROR,
            ..
        })
    ));

    let p = b.mem_alloc(2 * MIB, 0).unwrap();
    let blocking = b.comm_init_one_rank(0).expect("ncclCommInitRank");
    assert!(!blocking.is_null());
    for (ptr, size) in [(0, 2 * MIB), (p, 0)] {
        assert!(matches!(
            b.comm_window_register(blocking, ptr, size, NCCL_WIN_COLL_SYMMETRIC),
            Err(BackendError::InvalidArgument {
                call: "ncclCommWindowRegister",
                ..
            })
        ));
    }
    let nonblocking = b
        .comm_init_one_rank_nonblocking(0, &Wait::unbounded())
        .unwrap();
    for comm in [blocking, nonblocking] {
        let w = b
            .comm_window_register(comm, p, 2 * MIB, NCCL_WIN_COLL_SYMMETRIC)
            .unwrap()
            .expect("a window");
        b.comm_window_deregister(comm, w).unwrap();
        b.comm_abort(comm).unwrap();
        let e = b
            .comm_window_register(comm, p, 2 * MIB, NCCL_WIN_COLL_SYMMETRIC)
            .unwrap_err();
        assert_eq!(
            e,
            BackendError::Nccl {
                call: "ncclCommCuDevice",
                code: 5,
                message: "fake: invalid usage (ranks disagree): call on a comm after ncclCommAbort"
                    .into(),
            }
        );
    }

    // A registration NCCL fails (a stalled collective on a blocking comm,
    // released with an error): an error, not a registration without a
    // window.
    let comm = b.comm_init_one_rank(0).unwrap();
    fake.stall_next();
    thread::scope(|s| {
        s.spawn(|| {
            thread::sleep(Duration::from_millis(50));
            fake.release_stalls();
        });
        let e = b
            .comm_window_register(comm, p, 2 * MIB, NCCL_WIN_COLL_SYMMETRIC)
            .unwrap_err();
        assert!(
            matches!(
                e,
                BackendError::Nccl {
                    call: "ncclCommWindowRegister",
                    code: SYSTEM_ERROR,
                    ..
                }
            ),
            "{e}"
        );
    });
    // SAFETY: made by this test, used by nobody else.
    unsafe { b.comm_destroy(comm) }.unwrap();
    b.mem_free(p).unwrap();
    assert_eq!(fake.outstanding(), (0, 0));
}

/// The agreement's all-reduce refuses what it cannot do (no words, more
/// than its buffer holds, a comm not set up), gives up at the deadline on
/// a stream that never finishes, and its teardown frees the buffer and
/// the stream its setup made.
#[test]
fn the_agreement_all_reduce_refuses_bad_input_and_frees_what_it_made() {
    if !fake::in_child("the_agreement_all_reduce_refuses_bad_input_and_frees_what_it_made") {
        return;
    }
    use segment_registry_nccl::MAX_AGREEMENT_WORDS;
    let b = RealBackend::new().expect("the real backend on the fake library");
    let fake = fake::Controls::load();
    let comm = b.comm_init_one_rank(0).unwrap();
    let wait = Wait::unbounded();
    let invalid = |e: BackendError| {
        matches!(
            e,
            BackendError::InvalidArgument {
                call: "ncclAllReduce",
                ..
            }
        )
    };
    let mut full = [1u64; MAX_AGREEMENT_WORDS];
    assert!(
        invalid(b.all_reduce_max_u64(comm, &mut full, &wait).unwrap_err()),
        "not set up"
    );
    let before = fake.cuda_outstanding();
    b.all_reduce_setup(comm).unwrap();
    assert_eq!(fake.cuda_outstanding(), (before.0 + 1, before.1 + 1));
    assert!(invalid(
        b.all_reduce_max_u64(comm, &mut [], &wait).unwrap_err()
    ));
    let mut over = [1u64; MAX_AGREEMENT_WORDS + 1];
    assert!(invalid(
        b.all_reduce_max_u64(comm, &mut over, &wait).unwrap_err()
    ));
    b.all_reduce_max_u64(comm, &mut full, &wait)
        .expect("as many words as the buffer holds");
    assert_eq!(full, [1; MAX_AGREEMENT_WORDS]);

    fake.stream_busy(i32::MAX);
    let e = b
        .all_reduce_max_u64(
            comm,
            &mut full,
            &Wait::give_up_after(Duration::from_millis(50)),
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            BackendError::Timeout {
                call: "ncclAllReduce",
                ..
            }
        ),
        "{e}"
    );
    fake.stream_busy(0);

    b.all_reduce_teardown(comm);
    assert_eq!(
        fake.cuda_outstanding(),
        before,
        "the stream and the buffer are freed"
    );
    assert!(
        invalid(b.all_reduce_max_u64(comm, &mut full, &wait).unwrap_err()),
        "torn down"
    );
    // SAFETY: made by this test, used by nobody else.
    unsafe { b.comm_destroy(comm) }.unwrap();
}

/// The figures the real backend passes on from the driver and NCCL: its
/// name, NCCL's version (kept and re-read), the device count, and a
/// device's free and total memory.
#[test]
fn the_real_backend_reports_what_the_driver_and_nccl_say() {
    if !fake::in_child("the_real_backend_reports_what_the_driver_and_nccl_say") {
        return;
    }
    std::env::remove_var("CUDA_VISIBLE_DEVICES");
    std::env::set_var("FAKE_GPUS", "3");
    let b = RealBackend::new().expect("the real backend on the fake library");
    assert_eq!(b.name(), "nccl");
    assert_eq!((b.nccl_version(), b.read_version()), (22809, Ok(22809)));
    assert_eq!(<RealBackend as Backend>::nccl_version(&b), 22809);
    assert_eq!(b.device_count(), Ok(3));
    let total = 80 << 30;
    assert_eq!(b.mem_get_info(0), Ok((total, total)));
    let p = b.mem_alloc(2 * MIB, 0).unwrap();
    assert_eq!(b.mem_get_info(0), Ok((total - 2 * MIB, total)));
    b.mem_free(p).unwrap();
}

/// Two ranks of one comm on two threads (the fake meets them through its
/// files): the blocking and the non-blocking init, each rank's size and
/// rank, a sum all-reduce; one rank alone; ranks out of range are refused
/// before NCCL.
#[test]
fn two_ranks_join_a_comm_and_sum_across_it() {
    if !fake::in_child("two_ranks_join_a_comm_and_sum_across_it") {
        return;
    }
    let b = RealBackend::new().expect("the real backend on the fake library");
    let id = b.unique_id().unwrap();
    for (nranks, rank) in [(2, -1), (2, 2), (0, 0), (-1, -1)] {
        for e in [
            b.comm_init_rank(0, nranks, rank, &id).unwrap_err(),
            b.comm_init_rank_nonblocking(0, nranks, rank, &id, &Wait::unbounded())
                .unwrap_err(),
        ] {
            assert!(
                matches!(e, BackendError::InvalidArgument { .. }),
                "rank {rank} of {nranks}: {e}"
            );
        }
    }
    let one = b.comm_init_rank(0, 1, 0, &b.unique_id().unwrap()).unwrap();
    let one_nb = b
        .comm_init_rank_nonblocking(0, 1, 0, &b.unique_id().unwrap(), &Wait::unbounded())
        .unwrap();
    for c in [one, one_nb] {
        // SAFETY: made just above, used by nobody else.
        unsafe { b.comm_destroy(c) }.unwrap();
    }
    let blocking = b.unique_id().unwrap();
    let nonblocking = b.unique_id().unwrap();
    thread::scope(|s| {
        let ranks: Vec<_> = (0..2)
            .map(|r| {
                let (b, blocking, nonblocking) = (&b, &blocking, &nonblocking);
                s.spawn(move || {
                    let c = b.comm_init_rank(0, 2, r, blocking).unwrap();
                    let nb = b
                        .comm_init_rank_nonblocking(0, 2, r, nonblocking, &Wait::unbounded())
                        .unwrap();
                    for comm in [c, nb] {
                        // SAFETY: made just above by this thread.
                        assert_eq!(unsafe { b.comm_rank_info(comm) }.unwrap(), (2, r));
                    }
                    let buf = b.mem_alloc(2 * MIB, 0).unwrap();
                    let mine = [1.0f32 + r as f32, 10.0];
                    // SAFETY: `buf` is 2 MiB of ncclMemAlloc memory on
                    // device 0, the comm's device.
                    unsafe { b.copy_to_device_f32(0, buf, &mine) }.unwrap();
                    // SAFETY: as above; `c` is this thread's live comm.
                    unsafe { b.all_reduce_sum_f32(c, buf, buf, 2) }.unwrap();
                    // SAFETY: as above.
                    let sum = unsafe { b.copy_from_device_f32(0, buf, 2) }.unwrap();
                    assert_eq!(sum, [3.0, 20.0]);
                    b.mem_free(buf).unwrap();
                    for comm in [c, nb] {
                        // SAFETY: ours, used by nobody else any more.
                        unsafe { b.comm_destroy(comm) }.unwrap();
                    }
                })
            })
            .collect();
        for r in ranks {
            r.join().unwrap();
        }
    });
}

/// Each call runs on its device's primary context and leaves the calling
/// thread's current context as it was: none, or the device the
/// application bound.
#[test]
fn calls_run_on_their_device_and_leave_the_thread_s_context_as_it_was() {
    if !fake::in_child("calls_run_on_their_device_and_leave_the_thread_s_context_as_it_was") {
        return;
    }
    std::env::remove_var("CUDA_VISIBLE_DEVICES");
    std::env::set_var("FAKE_GPUS", "2");
    let b = RealBackend::new().expect("the real backend on the fake library");
    let fake = fake::Controls::load();
    assert_eq!(fake.current_context(), 0, "none bound");
    let on0 = b.comm_init_one_rank(0).unwrap();
    assert_eq!(fake.comm_device(on0), 0);
    assert_eq!(fake.current_context(), 0, "still none");
    let _bound = b.bind_device(1).unwrap();
    let ctx1 = fake.current_context();
    assert_ne!(ctx1, 0);
    let again0 = b.comm_init_one_rank(0).unwrap();
    assert_eq!(fake.comm_device(again0), 0, "made on device 0");
    assert_eq!(fake.current_context(), ctx1, "device 1's context again");
    let on1 = b.comm_init_one_rank(1).unwrap();
    assert_eq!(fake.comm_device(on1), 1);
    assert_eq!(fake.current_context(), ctx1);
    for c in [on0, again0, on1] {
        // SAFETY: made by this test, used by nobody else.
        unsafe { b.comm_destroy(c) }.unwrap();
    }
}
