//! The allocator on the simulated NCCL: several ranks, two comms sharing
//! one pool per rank.
#![cfg(not(feature = "loom"))]

mod common;

use std::sync::mpsc;
use std::thread;

use common::*;
use segment_registry_nccl::sim::{set_alloc_site, SimOp, Violation};
use segment_registry_nccl::{
    AllocError, AttachError, BackendError, CommState, DetachError, FreeError, RawComm,
    RegisterError,
};

/// SGLang's scenario: a segment registered by group A's pass is freed, and
/// its address comes back from the next allocation, which group B's pass
/// registers. The new segment is registered with B (and again with A) and
/// never confused with the old one.
#[test]
fn sglang_freed_segment_reused_at_same_address_is_a_new_segment() {
    let job = Job::new(2, 2);
    let (a, b) = (0, 1);
    thread::scope(|s| {
        for r in 0..2 {
            let job = &job;
            s.spawn(move || {
                let al = &job.ranks[r];
                let (ca, cb) = (job.ids[a][r], job.ids[b][r]);
                let x = al.alloc(8 * MIB, 0).unwrap();
                let seg_x = al.find(x).unwrap();
                let pass = al.register(ca).unwrap();
                assert_eq!(pass.registered, vec![seg_x]);
                assert_eq!(pass.windows, 1);

                let freed = al.free(x).unwrap();
                assert_eq!((freed.windows, freed.deferred), (1, 0));
                assert!(!job.world.is_allocated(r, x));

                let y = al.alloc(8 * MIB, 0).unwrap();
                assert_eq!(y, x, "ncclMemAlloc hands the freed range out again");
                let seg_y = al.find(y).unwrap();
                assert_ne!(seg_y.seq, seg_x.seq);

                let pb = al.register(cb).unwrap();
                assert_eq!(pb.registered, vec![seg_y], "B registers y, once");
                let pa = al.register(ca).unwrap();
                assert_eq!(pa.registered, vec![seg_y], "A registers y: not the old x");

                let stats = al.stats();
                assert_eq!(stats.comms.len(), 2);
                for c in &stats.comms {
                    assert_eq!((c.windows, c.pending), (1, 0), "{c:?}");
                }
                assert_eq!(job.world.windows_on(job.raws[a][r]).len(), 1);
                assert_eq!(job.world.windows_on(job.raws[b][r]).len(), 1);

                let gone = al.free(y).unwrap();
                assert_eq!(gone.windows, 2);
                assert!(!job.world.is_allocated(r, y));
            });
        }
    });
    for al in &job.ranks {
        let s = al.stats();
        assert_eq!((s.allocs, s.frees, s.mem_frees), (2, 2, 2));
        assert_eq!((s.windows_registered, s.windows_deregistered), (3, 3));
    }
    job.finish();
}

/// A free deregisters every window before ncclMemFree; and a free that
/// lands while a pass holds the segment (its register in flight, parked on
/// a barrier) returns at once: the pass registers it, then deregisters and
/// frees it. A deregistration meeting that pass on the same comm is queued
/// and performed right after the pass's current call.
#[test]
fn free_during_a_pass_never_waits_and_the_pass_cleans_up() {
    let job = Job::new(2, 2);
    let (a, b) = (0, 1);
    // Rank 0's program, step by step, with its pass on comm A parked.
    let r = 0;
    let al = &job.ranks[r];
    let (ca, cb) = (job.ids[a][r], job.ids[b][r]);
    let s0 = al.alloc(2 * MIB, 0).unwrap();
    al.register(ca).unwrap();
    al.register(cb).unwrap();
    let s1 = al.alloc(4 * MIB, 0).unwrap();
    let s2 = al.alloc(2 * MIB, 0).unwrap();
    let (seg1, seg2) = (al.find(s1).unwrap(), al.find(s2).unwrap());
    let park = park_register(&job.world, r, s1);

    thread::scope(|s| {
        let _unpark = park.unpark_on_panic();
        let pass = s.spawn(|| al.register(ca));
        park.entered(); // the pass is inside ncclCommWindowRegister(s1)

        let f2 = al.free(s2).unwrap();
        assert!(f2.held_by_pass && f2.windows == 0);
        let f1 = al.free(s1).unwrap();
        assert!(f1.held_by_pass && f1.windows == 0);
        // s0 has a window on A (busy: queued) and one on B (done now).
        let f0 = al.free(s0).unwrap();
        assert_eq!((f0.windows, f0.deferred), (2, 1));

        // Nothing freed under a window or a registration in flight.
        for p in [s0, s1, s2] {
            assert!(job.world.is_allocated(r, p), "{p:#x} freed too early");
        }
        let st = al.stats();
        assert_eq!(st.deregisters_deferred, 1);
        assert_eq!(st.pending_frees, 3);
        assert_eq!(st.comms[0].queued, 1);
        assert!(
            job.world.violations().is_empty(),
            "{:?}",
            job.world.violations()
        );

        park.release();
        let summary = pass.join().unwrap().unwrap();
        assert_eq!(summary.registered, vec![seg1, seg2]);
        assert_eq!(summary.handed_back, 2);
    });
    job.world.set_hook(None);
    for p in [s0, s1, s2] {
        assert!(!job.world.is_allocated(r, p), "{p:#x} leaked");
    }
    let st = al.stats();
    assert_eq!((st.pending_frees, st.mem_frees, st.handed_back), (0, 3, 2));

    // The order on rank 0: register(s1) completes, then the queued
    // deregistration of s0's A window, then register(s2); s1's window is
    // deregistered before s1 is freed.
    let t = job.world.trace();
    let w0a = window_of(&t, r, s0);
    let reg1 = position(&t, |e| {
        e.rank == r && e.op == SimOp::Register && e.ptr == s1
    });
    let dereg0 = position(&t, |e| {
        e.rank == r && e.op == SimOp::Deregister && e.window == Some(w0a)
    });
    let reg2 = position(&t, |e| {
        e.rank == r && e.op == SimOp::Register && e.ptr == s2
    });
    assert!(reg1 < dereg0 && dereg0 < reg2, "{reg1} {dereg0} {reg2}");
    let w1 = window_of(&t, r, s1);
    let dereg1 = position(&t, |e| e.op == SimOp::Deregister && e.window == Some(w1));
    let free1 = position(&t, |e| e.rank == r && e.op == SimOp::MemFree && e.ptr == s1);
    assert!(dereg1 < free1);

    // Rank 1 runs the same program unparked, so both ranks made the same
    // collective calls.
    let al1 = &job.ranks[1];
    let q0 = al1.alloc(2 * MIB, 0).unwrap();
    al1.register(job.ids[a][1]).unwrap();
    al1.register(job.ids[b][1]).unwrap();
    let q1 = al1.alloc(4 * MIB, 0).unwrap();
    let q2 = al1.alloc(2 * MIB, 0).unwrap();
    al1.register(job.ids[a][1]).unwrap();
    for q in [q2, q1, q0] {
        al1.free(q).unwrap();
    }
    // Both ranks owe B the registration of s1 and s2? No: they were freed
    // before B's next pass, on both ranks alike.
    for (r, al) in job.ranks.iter().enumerate() {
        assert_eq!(al.register(job.ids[b][r]).unwrap().registered, vec![]);
    }
    job.finish();
}

/// Injected faults lose no window handle and free no memory under a window.
#[test]
fn fault_injection_loses_no_handle() {
    let job = Job::new(2, 2);
    let w = &job.world;

    // A failed ncclMemAlloc tracks nothing.
    w.fail_nth(0, SimOp::MemAlloc, 1);
    let e = job.ranks[0].alloc(2 * MIB, 0).unwrap_err();
    assert!(matches!(
        e,
        AllocError::Backend(BackendError::Injected { .. })
    ));
    let st = job.ranks[0].stats();
    assert_eq!((st.live_segments, st.alloc_failures, st.allocs), (0, 1, 0));

    // Every rank: x registered with both comms.
    let xs: Vec<usize> = job
        .ranks
        .iter()
        .map(|a| a.alloc(2 * MIB, 0).unwrap())
        .collect();
    for al in &job.ranks {
        for (_, r) in al.register_all() {
            assert_eq!(r.unwrap().windows, 1);
        }
    }

    // Rank 0's first deregistration fails: that window stays registered,
    // so the memory stays allocated, and the window waits for a retry.
    w.fail_nth(0, SimOp::Deregister, 1);
    let al = &job.ranks[0];
    assert_eq!(al.free(xs[0]).unwrap().windows, 2);
    assert!(w.is_allocated(0, xs[0]), "freed under a window");
    let st = al.stats();
    assert_eq!(
        (st.windows_stuck, st.pending_frees, st.deregister_failures),
        (1, 1, 1)
    );
    assert!(al.last_async_error().unwrap().contains("injected"));
    let stuck_comm = st.comms.iter().find(|c| c.stuck == 1).unwrap().comm;
    // The next pass on that comm retries it; the memory then goes back.
    al.register(stuck_comm).unwrap();
    assert!(!w.is_allocated(0, xs[0]));
    let st = al.stats();
    assert_eq!(
        (st.windows_stuck, st.pending_frees, st.mem_frees),
        (0, 0, 1)
    );
    job.ranks[1].free(xs[1]).unwrap();

    // A deregistration failing inside detach: detach reports it, the comm
    // stays (no passes), and a second detach finishes the job.
    let ys: Vec<usize> = job
        .ranks
        .iter()
        .map(|a| a.alloc(2 * MIB, 0).unwrap())
        .collect();
    for al in &job.ranks {
        for (_, r) in al.register_all() {
            r.unwrap();
        }
    }
    // Two failures: detach's own attempt and its immediate retry.
    w.fail_nth(1, SimOp::Deregister, 1);
    w.fail_nth(1, SimOp::Deregister, 2);
    let c = job.ids[0][1];
    let e = job.ranks[1].detach(c).unwrap_err();
    assert!(
        matches!(e, DetachError::Incomplete { remaining: 1, .. }),
        "{e:?}"
    );
    let info = job.ranks[1].stats().comms[0].clone();
    assert_eq!(
        (info.comm, info.state, info.stuck),
        (c, CommState::Detaching, 1)
    );
    assert_eq!(job.ranks[1].register(c), Err(RegisterError::NotAttached(c)));
    assert_eq!(job.world.windows_on(job.raws[0][1]).len(), 1);
    let done = job.ranks[1].detach(c).unwrap();
    assert_eq!(done.deregistered, 0, "the retry, not a new deregistration");
    assert!(job.world.windows_on(job.raws[0][1]).is_empty());
    assert_eq!(job.ranks[1].detach(c), Err(DetachError::NotAttached(c)));
    // Rank 1's y still has its other window; free it, and rank 0's y.
    assert_eq!(job.ranks[1].free(ys[1]).unwrap().windows, 1);
    assert_eq!(job.ranks[0].free(ys[0]).unwrap().windows, 2);
    job.world.comm_destroy(job.raws[0][1]).unwrap();
    job.ranks[0].detach(job.ids[0][0]).unwrap();
    job.world.comm_destroy(job.raws[0][0]).unwrap();
    for (r, al) in job.ranks.iter().enumerate() {
        al.detach(job.ids[1][r]).unwrap();
        job.world.comm_destroy(job.raws[1][r]).unwrap();
        let s = al.stats();
        assert_eq!(
            (s.live_segments, s.pending_frees, s.windows_stuck),
            (0, 0, 0)
        );
        assert_eq!(s.mem_frees, s.allocs);
    }
    assert_clean(&job.world);
}

/// A failed registration marks the comm failed: the segments before it stay
/// registered (and are deregistered later), the failed one holds no window,
/// later passes refuse, only detach is allowed, other comms go on.
#[test]
fn failed_register_leaves_the_comm_failed_not_half_registered() {
    let job = Job::new(2, 2);
    let (a, b) = (0, 1);
    let mut segs = [Vec::new(), Vec::new()];
    for (r, al) in job.ranks.iter().enumerate() {
        for _ in 0..3 {
            segs[r].push(al.alloc(2 * MIB, 0).unwrap());
        }
    }
    job.world.fail_nth(1, SimOp::Register, 2);
    assert_eq!(job.ranks[0].register(job.ids[a][0]).unwrap().windows, 3);
    let al = &job.ranks[1];
    let ca = job.ids[a][1];
    let e = al.register(ca).unwrap_err();
    match &e {
        RegisterError::Register {
            comm,
            segment,
            source,
        } => {
            assert_eq!(*comm, ca);
            assert_eq!(segment.addr, segs[1][1]);
            assert!(matches!(source, BackendError::Injected { .. }));
        }
        e => panic!("unexpected {e:?}"),
    }
    let st = al.stats();
    let info = &st.comms[0];
    assert_eq!((info.state, info.windows), (CommState::Failed, 1));
    assert!(info.failure.as_deref().unwrap().contains("injected"));
    assert_eq!(st.register_failures, 1);
    assert_eq!(
        job.world.windows_on(job.raws[a][1]).len(),
        1,
        "only the first"
    );
    // No retry: the peers may have completed the call.
    assert!(matches!(al.register(ca), Err(RegisterError::Failed { .. })));
    let all = al.register_all();
    assert!(matches!(all[0].1, Err(RegisterError::Failed { .. })));
    assert_eq!(
        all[1].1.as_ref().unwrap().windows,
        3,
        "comm B is unaffected"
    );
    assert_eq!(job.ranks[0].register(job.ids[b][0]).unwrap().windows, 3);

    // Free the first segment: its A window is deregistered all the same.
    assert_eq!(al.free(segs[1][0]).unwrap().windows, 2);
    // Detach the failed comm: nothing left on it.
    assert_eq!(al.detach(ca).unwrap().deregistered, 0);
    assert!(job.world.windows_on(job.raws[a][1]).is_empty());
    job.ranks[0].detach(job.ids[a][0]).unwrap();
    for r in 0..2 {
        job.world.comm_destroy(job.raws[a][r]).unwrap();
    }
    // The failed collective left the ranks' counts apart: 3 against 2.
    let v = job.world.verify();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        matches!(&v[0], Violation::CollectiveCountMismatch { counts, .. } if counts == &[(0, 3), (1, 2)])
    );
    for (r, al) in job.ranks.iter().enumerate() {
        for &p in &segs[r] {
            let _ = al.free(p);
        }
        al.detach(job.ids[b][r]).unwrap();
        job.world.comm_destroy(job.raws[b][r]).unwrap();
        assert_eq!(al.stats().mem_frees, 3);
    }
    let s = job.world.stats();
    assert_eq!((s.live_windows, s.live_allocs), (0, 0));
    assert_deregistered_before_free(&job.world.trace());
}

/// Two allocating threads per rank: the ranks' allocation (and so
/// registration) orders differ, and the simulator reports it; the same
/// program with one order everywhere is clean.
#[test]
fn two_allocating_threads_per_rank_make_orders_differ_and_sim_reports_it() {
    fn run(orders: [[&'static str; 2]; 2]) -> Vec<Violation> {
        let job = Job::new(2, 1);
        thread::scope(|s| {
            for (r, order) in orders.iter().enumerate() {
                let job = &job;
                s.spawn(move || {
                    let al = &job.ranks[r];
                    // Two threads, sites "x" and "y", each allocating one
                    // 2 MiB buffer; `orders[r]` says who goes first.
                    let (tx, rx) = mpsc::channel::<()>();
                    let rx = std::sync::Mutex::new(rx);
                    thread::scope(|s2| {
                        for site in ["x", "y"] {
                            let first = order[0] == site;
                            let (tx, rx) = (tx.clone(), &rx);
                            s2.spawn(move || {
                                if !first {
                                    rx.lock().unwrap().recv().unwrap();
                                }
                                set_alloc_site(Some(site));
                                al.alloc(2 * MIB, 0).unwrap();
                                if first {
                                    tx.send(()).unwrap();
                                }
                            });
                        }
                    });
                    assert_eq!(al.register(job.ids[0][r]).unwrap().windows, 2);
                    al.free_all();
                });
            }
        });
        let v = job.world.verify();
        for (r, al) in job.ranks.iter().enumerate() {
            al.detach(job.ids[0][r]).unwrap();
            job.world.comm_destroy(job.raws[0][r]).unwrap();
        }
        v
    }
    let differ = run([["x", "y"], ["y", "x"]]);
    let kinds: Vec<_> = differ.iter().map(|v| v.kind()).collect();
    assert_eq!(
        kinds,
        vec!["collective-order", "collective-order"],
        "{differ:?}"
    );
    let same = run([["x", "y"], ["x", "y"]]);
    assert!(same.is_empty(), "{same:?}");
}

/// Many threads allocate and free while passes run on two comms: no rule
/// is broken, every window is deregistered once, all memory goes back.
#[test]
fn concurrent_alloc_free_and_passes_stay_clean() {
    let job = Job::new(1, 2);
    let al = &job.ranks[0];
    let stop = std::sync::atomic::AtomicBool::new(false);
    let start = std::sync::Barrier::new(4);
    thread::scope(|s| {
        let passes = s.spawn(|| {
            start.wait();
            let mut n = 0u64;
            loop {
                for (_, r) in al.register_all() {
                    r.unwrap();
                }
                n += 1;
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return n;
                }
            }
        });
        let workers: Vec<_> = (0..3)
            .map(|t| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    let mut live = Vec::new();
                    for i in 0..400usize {
                        live.push(al.alloc((1 + (i + t) % 3) * MIB, 0).unwrap());
                        if i % 3 == 2 {
                            let p = live.swap_remove((i * 7 + t) % live.len());
                            al.free(p).unwrap();
                        }
                    }
                    for p in live {
                        al.free(p).unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(passes.join().unwrap() >= 1);
    });
    for (_, r) in al.register_all() {
        r.unwrap();
    }
    let s = al.stats();
    assert_eq!((s.allocs, s.frees, s.mem_frees), (1200, 1200, 1200));
    assert_eq!(
        (s.live_segments, s.pending_frees, s.windows_stuck),
        (0, 0, 0)
    );
    assert_eq!(s.windows_registered, s.windows_deregistered);
    assert_eq!(job.world.stats().live_allocs, 0);
    job.finish();
}

/// A destroyed comm's address comes back for a new comm: attaching it gives
/// a new id, and its first pass registers every live segment.
#[test]
fn a_reused_comm_address_is_a_new_comm() {
    let job = Job::new(1, 1);
    let al = &job.ranks[0];
    let (old_raw, old_id) = (job.raws[0][0], job.ids[0][0]);
    let p = al.alloc(2 * MIB, 0).unwrap();
    let q = al.alloc(2 * MIB, 0).unwrap();
    assert_eq!(al.register(old_id).unwrap().windows, 2);
    assert_eq!(
        al.attach(old_raw),
        Err(AttachError::AlreadyAttached {
            raw: old_raw,
            comm: old_id
        })
    );
    assert_eq!(al.detach(old_id).unwrap().deregistered, 2);
    job.world.comm_destroy(old_raw).unwrap();
    let new_raw = job.world.comm_create(&[0]).unwrap()[0];
    assert_eq!(new_raw, old_raw);
    let new_id = al.attach(new_raw).unwrap();
    assert!(new_id > old_id);
    assert_eq!(al.comm_id(new_raw), Some(new_id));
    assert_eq!(al.register(old_id), Err(RegisterError::NotAttached(old_id)));
    let pass = al.register(new_id).unwrap();
    assert_eq!(pass.registered.len(), 2);
    assert_eq!(al.free(p).unwrap().windows, 1);
    assert_eq!(al.free(q).unwrap().windows, 1);
    al.detach(new_id).unwrap();
    job.world.comm_destroy(new_raw).unwrap();
    assert_clean(&job.world);
}

/// A null window (no symmetric support) counts as registered: the watermark
/// moves, nothing is deregistered, the comm reports no symmetric support.
#[test]
fn a_null_window_counts_as_registered_without_a_window() {
    let job = Job::new(1, 0);
    let al = &job.ranks[0];
    let raw = job.world.comm_create_without_symmetric(&[0]).unwrap()[0];
    let c = al.attach(raw).unwrap();
    let p = al.alloc(2 * MIB, 0).unwrap();
    let pass = al.register(c).unwrap();
    assert_eq!(
        (pass.registered.len(), pass.windows, pass.null_windows),
        (1, 0, 1)
    );
    let st = al.stats();
    assert_eq!(st.comms[0].symmetric, Some(false));
    assert_eq!((st.comms[0].pending, st.comms[0].windows), (0, 0));
    assert!(al.register(c).unwrap().registered.is_empty());
    assert_eq!(al.free(p).unwrap().windows, 0);
    al.detach(c).unwrap();
    job.world.comm_destroy(raw).unwrap();
    assert_clean(&job.world);
    assert_eq!(job.world.stats().deregisters, 0);
}

/// Bad input gets a typed error and changes nothing.
#[test]
fn bad_input_gets_typed_errors() {
    let job = Job::new(1, 1);
    let al = &job.ranks[0];
    let c = job.ids[0][0];
    assert_eq!(al.alloc(0, 0), Err(AllocError::ZeroSize));
    assert!(matches!(al.alloc(MIB, -1), Err(AllocError::Backend(_))));
    assert_eq!(al.free(0), Err(FreeError::Null));
    assert_eq!(
        al.free(0x1234_0000),
        Err(FreeError::Unknown { ptr: 0x1234_0000 })
    );
    let p = al.alloc(2 * MIB, 0).unwrap();
    assert_eq!(al.free(p + 4096), Err(FreeError::Unknown { ptr: p + 4096 }));
    al.register(c).unwrap();
    al.free(p).unwrap();
    assert_eq!(
        al.free(p),
        Err(FreeError::Unknown { ptr: p }),
        "double free"
    );
    assert_eq!(al.attach(RawComm(0)), Err(AttachError::NullComm));
    let unknown = segment_registry_nccl::CommId(999);
    assert_eq!(
        al.register(unknown),
        Err(RegisterError::NotAttached(unknown))
    );
    assert_eq!(al.detach(unknown), Err(DetachError::NotAttached(unknown)));

    // A second pass on a comm whose pass is running: Busy, at once.
    let q = al.alloc(2 * MIB, 0).unwrap();
    let park = park_register(&job.world, 0, q);
    thread::scope(|s| {
        let _unpark = park.unpark_on_panic();
        let t = s.spawn(|| al.register(c));
        park.entered();
        assert_eq!(al.register(c), Err(RegisterError::Busy(c)));
        park.release();
        assert_eq!(t.join().unwrap().unwrap().windows, 1);
    });
    job.world.set_hook(None);
    al.free(q).unwrap();
    let st = al.stats();
    assert_eq!((st.bad_frees, st.alloc_failures), (4, 2));
    job.finish();
}

/// Detach waits for nothing but the comm's own pass: with a segment freed
/// while another comm's pass holds it, detaching the first comm still
/// deregisters its window before the memory goes back.
#[test]
fn detach_while_another_comm_pass_holds_a_freed_segment() {
    let job = Job::new(1, 2);
    let al = &job.ranks[0];
    let (ca, cb) = (job.ids[0][0], job.ids[1][0]);
    let p = al.alloc(2 * MIB, 0).unwrap();
    al.register(ca).unwrap();
    let park = park_register(&job.world, 0, p);
    thread::scope(|s| {
        let _unpark = park.unpark_on_panic();
        let t = s.spawn(|| al.register(cb));
        park.entered();
        // p: window on A, held by B's pass.
        let f = al.free(p).unwrap();
        assert!(f.held_by_pass);
        assert_eq!((f.windows, f.deferred), (1, 0));
        assert_eq!(al.detach(ca).unwrap().deregistered, 0);
        assert!(
            job.world.is_allocated(0, p),
            "B's registration is in flight"
        );
        park.release();
        assert_eq!(t.join().unwrap().unwrap().handed_back, 1);
    });
    job.world.set_hook(None);
    assert!(!job.world.is_allocated(0, p));
    job.world.comm_destroy(job.raws[0][0]).unwrap();
    al.detach(cb).unwrap();
    job.world.comm_destroy(job.raws[1][0]).unwrap();
    assert_clean(&job.world);
}
