//! The allocator on the simulated NCCL: several ranks, two comms sharing
//! one pool per rank.
#![cfg(not(feature = "loom"))]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use common::*;
use segment_registry_nccl::allocator::WindowError;
use segment_registry_nccl::sim::{set_alloc_site, SimBackend, SimCall, SimOp, SimWorld, Violation};
use segment_registry_nccl::{
    AllocError, Allocator, AttachError, BackendError, CommId, CommState, DetachError, FreeError,
    RawComm, RegisterError, Window, WindowLookupError, WindowRef,
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

// ---------------------------------------------------------------------------
// Window lookup: (comm, ptr, size) -> (window, offset)
// ---------------------------------------------------------------------------

/// Every answer of `window_of` / `window_of_raw`: found (the window the
/// simulated NCCL issued, the tensor's offset), not attached, unknown raw
/// handle, not tracked, crosses the end, not registered yet, no window (no
/// symmetric support); a failed comm keeps its earlier windows; after
/// free, detach, and a reused comm address the lookups fail cleanly.
#[test]
fn window_lookup_gives_every_answer() {
    let world = SimWorld::new(1);
    let al = Allocator::new(world.rank(0).unwrap());
    let raw = world.comm_create(&[0]).unwrap()[0];
    let c = al.attach(raw).unwrap();
    let a = al.alloc(4 * MIB, 0).unwrap();
    let b = al.alloc(2 * MIB, 0).unwrap();
    let (seg_a, seg_b) = (al.find(a).unwrap(), al.find(b).unwrap());

    // Not registered yet.
    assert_eq!(
        al.window_of(c, a + 4096, 64),
        Err(WindowLookupError::NotRegistered {
            comm: c,
            segment: seg_a
        })
    );
    assert_eq!(al.register(c).unwrap().windows, 2);
    let trace = world.trace();
    let (wa, wb) = (window_of(&trace, 0, a), window_of(&trace, 0, b));
    assert_ne!(wa, wb);

    // Found: tensors at various offsets, through the id and the raw handle.
    for (t, size) in [
        (a, 4 * MIB),
        (a + 4096, 4096),
        (a + MIB + 12, 1000),
        (a + 4 * MIB - 8, 8),
        (a + 100, 0),
    ] {
        let want = WindowRef {
            window: wa,
            offset: t - a,
            segment: seg_a,
        };
        assert_eq!(al.window_of(c, t, size), Ok(want));
        assert_eq!(al.window_of_raw(raw, t, size), Ok(want));
    }
    let hit = al.window_of(c, b + 65_536, 4096).unwrap();
    assert_eq!((hit.window, hit.offset, hit.segment), (wb, 65_536, seg_b));
    assert!(world.windows_on(raw).contains(&hit.window));

    // Crosses the end; not tracked.
    for (t, size) in [(a + 4 * MIB - 8, 9), (a, 4 * MIB + 1), (b, usize::MAX)] {
        let seg = if t == b { seg_b } else { seg_a };
        assert_eq!(
            al.window_of(c, t, size),
            Err(WindowLookupError::CrossesEnd {
                ptr: t,
                size,
                segment: seg
            })
        );
    }
    for t in [0, 0x1000, b + 2 * MIB, b + 2 * MIB + 8192] {
        assert_eq!(
            al.window_of(c, t, 8),
            Err(WindowLookupError::NotTracked { ptr: t })
        );
    }

    // Not attached: an unknown id or raw handle.
    let unknown = CommId(999);
    assert_eq!(
        al.window_of(unknown, a, 8),
        Err(WindowLookupError::NotAttached(unknown))
    );
    assert_eq!(
        al.window_of(unknown, 0x1000, 8),
        Err(WindowLookupError::NotAttached(unknown)),
        "not attached wins over not tracked"
    );
    let stranger = RawComm(0x4242_0000);
    assert_eq!(
        al.window_of_raw(stranger, a, 8),
        Err(WindowError::UnknownComm(stranger))
    );
    assert_eq!(
        al.window_of_raw(RawComm(0), a, 8),
        Err(WindowError::UnknownComm(RawComm(0)))
    );

    // No symmetric support: registered without a window.
    let raw_ns = world.comm_create_without_symmetric(&[0]).unwrap()[0];
    let ns = al.attach(raw_ns).unwrap();
    assert_eq!(al.register(ns).unwrap().null_windows, 2);
    assert_eq!(
        al.window_of_raw(raw_ns, a + 8, 8),
        Err(WindowError::Lookup(WindowLookupError::NoWindow {
            comm: ns,
            segment: seg_a
        }))
    );
    assert_eq!(al.window_of(c, a + 8, 8).unwrap().window, wa);

    // A failed comm keeps the windows it registered before the failure;
    // the segment it failed on has none.
    let raw_f = world.comm_create(&[0]).unwrap()[0];
    let f = al.attach(raw_f).unwrap();
    world.fail_nth(0, SimOp::Register, 2);
    assert!(matches!(
        al.register(f),
        Err(RegisterError::Register { .. })
    ));
    assert_eq!(al.stats().comms[2].state, CommState::Failed);
    let wf = al.window_of(f, a + 8, 8).unwrap();
    assert_eq!((wf.offset, wf.segment), (8, seg_a));
    assert_ne!(wf.window, wa);
    assert_eq!(
        al.window_of(f, b, 8),
        Err(WindowLookupError::NotRegistered {
            comm: f,
            segment: seg_b
        })
    );

    // After free: not tracked, on every comm, for every tensor of it.
    al.free(a).unwrap();
    for comm in [c, ns, f] {
        for t in [a, a + 4096, a + 4 * MIB - 8] {
            assert_eq!(
                al.window_of(comm, t, 8),
                Err(WindowLookupError::NotTracked { ptr: t })
            );
        }
    }
    assert!(!world.windows_on(raw).contains(&wa));
    // The address comes back for a new allocation: a new segment, which
    // has no window until a pass (never the freed one's).
    let a2 = al.alloc(4 * MIB, 0).unwrap();
    assert_eq!(a2, a);
    let seg_a2 = al.find(a2).unwrap();
    assert_eq!(
        al.window_of(c, a2 + 8, 8),
        Err(WindowLookupError::NotRegistered {
            comm: c,
            segment: seg_a2
        })
    );
    al.register(c).unwrap();
    let hit = al.window_of(c, a2 + 8, 8).unwrap();
    let issued = world
        .trace()
        .iter()
        .rev()
        .find(|e| e.op == SimOp::Register && e.comm == raw && e.ptr == a2 && e.ok)
        .and_then(|e| e.window);
    assert_eq!(Some(hit.window), issued);
    assert_ne!(hit.window, wa);

    // After detach: not attached, by id and by handle.
    al.detach(f).unwrap();
    assert_eq!(
        al.window_of(f, b, 8),
        Err(WindowLookupError::NotAttached(f))
    );
    assert_eq!(
        al.window_of_raw(raw_f, b, 8),
        Err(WindowError::UnknownComm(raw_f))
    );
    world.comm_destroy(raw_f).unwrap();
    al.detach(c).unwrap();
    world.comm_destroy(raw).unwrap();
    // The handle value comes back for a new comm: no window until its pass.
    let raw2 = world.comm_create(&[0]).unwrap()[0];
    assert!(raw2 == raw || raw2 == raw_f);
    let c2 = al.attach(raw2).unwrap();
    assert_eq!(
        al.window_of_raw(raw2, b, 8),
        Err(WindowError::Lookup(WindowLookupError::NotRegistered {
            comm: c2,
            segment: seg_b
        }))
    );
    assert_eq!(
        al.window_of(c, b, 8),
        Err(WindowLookupError::NotAttached(c))
    );

    al.detach(c2).unwrap();
    al.detach(ns).unwrap();
    world.comm_destroy(raw2).unwrap();
    world.comm_destroy(raw_ns).unwrap();
    al.free(a2).unwrap();
    al.free(b).unwrap();
    // The failed register is the only call that did not happen as planned.
    let v = world.verify();
    assert!(v.is_empty(), "{v:#?}");
    assert_eq!(world.stats().live_windows, 0);
}

/// Runs `f` on another thread and waits at most 5 s for its result: `None`
/// if it is still blocked. (A blocked thread is left behind; the test then
/// fails.)
fn within_5s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(5)).ok()
}

/// The success path takes no lock: lookups answer at once while (1) a pass
/// on the same comm is blocked inside a register (the comm's gate and pass
/// lock are taken), and (2) a detach waits for the comm table's write lock
/// behind a free that is blocked inside a deregistration while holding the
/// read lock; `comm_id`, which takes the read lock, is shown blocked then
/// (the control: a lookup that took the lock would block too).
#[test]
fn window_lookup_takes_no_lock_on_success() {
    let world = SimWorld::new(1);
    let al = Arc::new(Allocator::new(world.rank(0).unwrap()));
    let raws = world.comm_create(&[0]).unwrap();
    let raw1 = raws[0];
    let raw2 = world.comm_create(&[0]).unwrap()[0];
    let (c1, c2) = (al.attach(raw1).unwrap(), al.attach(raw2).unwrap());
    let a = al.alloc(2 * MIB, 0).unwrap();
    let b = al.alloc(2 * MIB, 0).unwrap();
    al.register(c1).unwrap();
    al.register(c2).unwrap();
    let wa = al.window_of(c1, a, 8).unwrap().window;
    let wb = al.window_of(c1, b, 8).unwrap().window;
    let wa2 = al.window_of(c2, a, 8).unwrap().window;

    // (1) A pass on c1 blocked in the register of a new segment.
    let p = al.alloc(2 * MIB, 0).unwrap();
    let park = park_register(&world, 0, p);
    thread::scope(|s| {
        let _unpark = park.unpark_on_panic();
        let pass = s.spawn(|| al.register(c1));
        park.entered();
        let al2 = al.clone();
        let got = within_5s(move || {
            (
                al2.window_of(c1, a + 64, 64),
                al2.window_of_raw(raw1, a + 64, 64),
                al2.window_of(c1, p, 64),
            )
        });
        let (hit, hit_raw, parked) = got.expect("a lookup waited for the pass");
        assert_eq!(hit.unwrap().window, wa);
        assert_eq!(hit_raw.unwrap().window, wa);
        assert!(
            matches!(parked, Err(WindowLookupError::NotRegistered { .. })),
            "{parked:?}"
        );
        park.release();
        assert_eq!(pass.join().unwrap().unwrap().windows, 1);
    });
    world.set_hook(None);

    // (2) Free b: its deregistration on c1 blocks (holding the table's read
    // lock); detach c2 then waits for the write lock.
    let entered = Arc::new(Barrier::new(2));
    let release = Arc::new(Barrier::new(2));
    let c2_dereg = Arc::new(Barrier::new(2));
    {
        let (e, r, d) = (entered.clone(), release.clone(), c2_dereg.clone());
        let armed = AtomicBool::new(true);
        let armed_d = AtomicBool::new(true);
        world.set_hook(Some(Arc::new(move |call: &SimCall| {
            if call.op != SimOp::Deregister {
                return;
            }
            if call.window == Some(wb) && armed.swap(false, Ordering::SeqCst) {
                e.wait();
                r.wait();
            } else if call.window == Some(wa2) && armed_d.swap(false, Ordering::SeqCst) {
                d.wait();
            }
        })));
    }
    let al_f = al.clone();
    let free = thread::spawn(move || al_f.free(b));
    entered.wait(); // the free is inside ncclCommWindowDeregister(wb)
    let al_d = al.clone();
    let detach = thread::spawn(move || al_d.detach(c2));
    c2_dereg.wait(); // the detach deregisters a's window on c2; next: the write lock
    thread::sleep(Duration::from_millis(200));
    assert!(!detach.is_finished(), "detach must wait for the free");

    // The control: a reader of the comm table is blocked now.
    let (tx, rx) = mpsc::channel();
    let al_r = al.clone();
    let reader = thread::spawn(move || tx.send(al_r.comm_id(raw1)).unwrap());
    let blocked = rx.recv_timeout(Duration::from_millis(300)).is_err();
    #[cfg(target_os = "linux")]
    assert!(
        blocked,
        "std's RwLock lets new readers in while a writer waits: the control proves nothing"
    );

    // The lookups answer anyway.
    let al_l = al.clone();
    let got = within_5s(move || {
        (
            al_l.window_of(c1, a + 8, 8),
            al_l.window_of_raw(raw1, a + 8, 8),
            al_l.window_of(c1, b, 8),
        )
    });
    let (hit, hit_raw, freed) = got.expect("a lookup took the comm table's lock");
    assert_eq!(hit.unwrap().window, wa);
    assert_eq!(hit_raw.unwrap().window, wa);
    assert_eq!(freed, Err(WindowLookupError::NotTracked { ptr: b }));

    release.wait();
    assert_eq!(free.join().unwrap().unwrap().windows, 2);
    assert_eq!(detach.join().unwrap().unwrap().deregistered, 1);
    if blocked {
        assert_eq!(rx.recv().unwrap(), Some(c1));
    }
    reader.join().unwrap();
    world.set_hook(None);

    al.free(a).unwrap();
    al.free(p).unwrap();
    al.detach(c1).unwrap();
    world.comm_destroy(raw1).unwrap();
    world.comm_destroy(raw2).unwrap();
    assert_clean(&world);
}

/// A lookup to check: what it asked, when it started, what it answered.
type Lookup<'a> =
    dyn Fn(&Allocator<SimBackend>, CommId, RawComm, usize, usize) -> WindowResult + Sync + 'a;
type WindowResult = Result<WindowRef<Window>, WindowError>;

/// What the race harness saw.
#[derive(Debug, Default)]
struct RaceReport {
    /// Broken rules, each described.
    violations: Vec<String>,
    /// Lookups that returned a window.
    found: u64,
    /// Of those, windows whose deregistration began after the lookup began
    /// and before the check after its return (a free that overlapped the
    /// lookup: allowed).
    overlapped: u64,
    /// Lookups refused because the segment was freed or not yet tracked.
    not_tracked: u64,
    /// Lookups refused because a pass had not registered the segment yet.
    not_registered: u64,
}

/// Frees race lookups: one thread allocates segments, registers them with
/// two comms and frees them in a shuffled order, round after round (the
/// simulated NCCL hands freed addresses out again); two threads look up
/// tensors at random places of the segments of the current round (through
/// `lookup`), and a last sweep looks up every address after all frees.
///
/// The check, on every window returned: the simulated NCCL issued it for
/// that comm and segment, the offset is right, and at the check right
/// after the lookup returned it is still registered, or else its
/// deregistration began after the lookup began (the deregistration hook
/// stamps a shared clock that the lookup also stamps when it starts). A
/// correct lookup linearizes before the free claims the window, which is
/// before the deregistration begins; one that returns a window after its
/// deregistration began (a stale cache, a window read after its claim)
/// fails the check.
fn race_lookups_with_frees(lookup: &Lookup<'_>, rounds: usize) -> RaceReport {
    const SLOTS: usize = 6;
    let world = SimWorld::new(1);
    let al = Allocator::new(world.rank(0).unwrap());
    let raws = [
        world.comm_create(&[0]).unwrap()[0],
        world.comm_create(&[0]).unwrap()[0],
    ];
    let ids = [al.attach(raws[0]).unwrap(), al.attach(raws[1]).unwrap()];
    let clock = Arc::new(AtomicU64::new(1));
    // Window -> clock stamp when its deregistration began.
    let dereg_at: Arc<Mutex<HashMap<Window, u64>>> = Arc::default();
    {
        let (clock, dereg_at) = (clock.clone(), dereg_at.clone());
        world.set_hook(Some(Arc::new(move |call: &SimCall| {
            if let (SimOp::Deregister, Some(w)) = (call.op, call.window) {
                // SeqCst: one total order with the lookups' stamps.
                let t = clock.fetch_add(1, Ordering::SeqCst);
                dereg_at.lock().unwrap().insert(w, t);
            }
        })));
    }
    // The current round's segments: (addr, len) per slot (0: none).
    let slots: Vec<(AtomicUsize, AtomicUsize)> = (0..SLOTS)
        .map(|_| (AtomicUsize::new(0), AtomicUsize::new(0)))
        .collect();
    let done = AtomicBool::new(false);
    // Lookups made so far: the writer lets some happen in each phase.
    let progress = AtomicU64::new(0);
    let let_lookups_run = || {
        let start = progress.load(Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_millis(20);
        while progress.load(Ordering::SeqCst) < start + 64 && std::time::Instant::now() < deadline {
            thread::yield_now();
        }
    };
    let report = Mutex::new(RaceReport::default());
    // Every distinct answer with a window: (comm index, window, segment).
    let returned: Mutex<HashSet<(usize, Window, usize)>> = Mutex::default();
    let ever: Mutex<Vec<(usize, usize)>> = Mutex::default();

    let check = |ci: usize,
                 ptr: usize,
                 size: usize,
                 t0: u64,
                 r: WindowResult,
                 local: &mut RaceReport,
                 mine: &mut HashSet<(usize, Window, usize)>| {
        match r {
            Ok(hit) => {
                local.found += 1;
                let seg = hit.segment;
                if hit.offset != ptr - seg.addr || ptr < seg.addr || ptr + size > seg.end() {
                    local.violations.push(format!(
                        "[{ptr:#x}, +{size}) -> {hit:?}: wrong offset/segment"
                    ));
                }
                if !world.windows_on(raws[ci]).contains(&hit.window) {
                    match dereg_at.lock().unwrap().get(&hit.window) {
                        Some(&d) if d > t0 => local.overlapped += 1,
                        d => local.violations.push(format!(
                            "lookup started at {t0} returned {:?}, deregistration began at {d:?}",
                            hit.window
                        )),
                    }
                }
                mine.insert((ci, hit.window, seg.addr));
            }
            Err(WindowError::Lookup(WindowLookupError::NotTracked { .. })) => {
                local.not_tracked += 1
            }
            Err(WindowError::Lookup(WindowLookupError::NotRegistered { .. })) => {
                local.not_registered += 1
            }
            Err(WindowError::Lookup(WindowLookupError::CrossesEnd { .. })) => {}
            Err(e) => local.violations.push(format!("unexpected {e:?}")),
        }
    };

    thread::scope(|s| {
        // The allocating and freeing thread.
        s.spawn(|| {
            let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
            for _ in 0..rounds {
                let mut mine = Vec::new();
                for (i, slot) in slots.iter().enumerate() {
                    let len = (1 + (xorshift(&mut rng) % 3) as usize) * 2 * MIB - 4096 * i;
                    let p = al.alloc(len, 0).unwrap();
                    slot.1.store(len, Ordering::SeqCst);
                    slot.0.store(p, Ordering::SeqCst);
                    ever.lock().unwrap().push((p, len));
                    mine.push(p);
                }
                // Tracked, not registered yet.
                let_lookups_run();
                for &c in &ids {
                    al.register(c).unwrap();
                }
                // Registered.
                let_lookups_run();
                // Shuffle, then free with the lookups running.
                for i in (1..mine.len()).rev() {
                    mine.swap(i, (xorshift(&mut rng) % (i as u64 + 1)) as usize);
                }
                for p in mine {
                    al.free(p).unwrap();
                    thread::yield_now();
                }
            }
            done.store(true, Ordering::SeqCst);
        });
        // Two looking-up threads.
        for seed in [1_u64, 2] {
            let (al, report, returned, slots, done, clock, progress) =
                (&al, &report, &returned, &slots, &done, &clock, &progress);
            let check = &check;
            s.spawn(move || {
                let mut rng = 0x2545_f491_4f6c_dd1d_u64 ^ seed;
                let mut local = RaceReport::default();
                let mut mine = HashSet::new();
                while !done.load(Ordering::SeqCst) {
                    let r = xorshift(&mut rng);
                    let slot = &slots[r as usize % SLOTS];
                    let (p, len) = (slot.0.load(Ordering::SeqCst), slot.1.load(Ordering::SeqCst));
                    if p == 0 {
                        continue;
                    }
                    let off = ((r >> 8) as usize % len.max(1)) & !7;
                    let size = ((r >> 40) as usize % 8192).min(len.saturating_sub(off));
                    let ci = (r >> 60) as usize % 2;
                    // SeqCst: see the hook.
                    let t0 = clock.fetch_add(1, Ordering::SeqCst);
                    let res = lookup(al, ids[ci], raws[ci], p + off, size);
                    check(ci, p + off, size, t0, res, &mut local, &mut mine);
                    progress.fetch_add(1, Ordering::SeqCst);
                }
                let mut rep = report.lock().unwrap();
                rep.violations.append(&mut local.violations);
                rep.found += local.found;
                rep.overlapped += local.overlapped;
                rep.not_tracked += local.not_tracked;
                rep.not_registered += local.not_registered;
                returned.lock().unwrap().extend(mine);
            });
        }
    });

    // The sweep: everything is freed now; no lookup may find a window.
    let mut local = RaceReport::default();
    let mut mine = HashSet::new();
    for &(p, len) in ever.lock().unwrap().iter() {
        for (ci, off) in [(0, 0), (1, 4096), (0, len - 8)] {
            let t0 = clock.fetch_add(1, Ordering::SeqCst);
            let res = lookup(&al, ids[ci], raws[ci], p + off, 8);
            check(ci, p + off, 8, t0, res, &mut local, &mut mine);
        }
    }
    world.set_hook(None);
    let mut report = report.into_inner().unwrap();
    report.violations.append(&mut local.violations);
    report.found += local.found;

    // Every window returned was issued for that comm and segment.
    let issued: HashMap<Window, (RawComm, usize)> = world
        .trace()
        .iter()
        .filter(|e| e.op == SimOp::Register && e.ok)
        .filter_map(|e| e.window.map(|w| (w, (e.comm, e.ptr))))
        .collect();
    returned.lock().unwrap().extend(mine);
    for (ci, w, addr) in returned.into_inner().unwrap() {
        if issued.get(&w) != Some(&(raws[ci], addr)) {
            report.violations.push(format!(
                "{w:?} returned for comm {ci}, segment {addr:#x}; issued for {:?}",
                issued.get(&w)
            ));
        }
    }
    for &c in &ids {
        al.detach(c).unwrap();
    }
    for r in raws {
        world.comm_destroy(r).unwrap();
    }
    assert_clean(&world);
    report
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Lookups racing frees on other threads never return a window whose
/// deregistration had begun when the lookup began (see
/// `race_lookups_with_frees`), through the id and the raw handle.
#[test]
fn window_lookup_racing_free_never_returns_a_deregistered_window() {
    let by_id: &Lookup<'_> = &|al, c, _, p, n| al.window_of(c, p, n).map_err(WindowError::from);
    let by_raw: &Lookup<'_> = &|al, _, raw, p, n| al.window_of_raw(raw, p, n);
    for (name, lookup) in [("window_of", by_id), ("window_of_raw", by_raw)] {
        let r = race_lookups_with_frees(lookup, 150);
        println!("{name}: {r:?}");
        assert!(r.violations.is_empty(), "{name}: {:#?}", r.violations);
        // The race was exercised: windows found, and lookups refused
        // because of a free or a pass not run yet.
        assert!(r.found > 100, "{name}: {r:?}");
        assert!(r.not_tracked > 0 && r.not_registered > 0, "{name}: {r:?}");
    }
}

/// The check above can fail: a lookup with a cache that is never
/// invalidated (it returns the window it found before for any pointer of
/// that segment, even after the free) is caught, in the race and in the
/// sweep after the last free.
#[test]
fn window_lookup_race_check_catches_a_stale_cache() {
    let cache: Mutex<Vec<(CommId, WindowRef<Window>)>> = Mutex::default();
    let stale: &Lookup<'_> = &|al, c, _, p, n| {
        let hit = cache.lock().unwrap().iter().find_map(|&(cc, h)| {
            (cc == c && h.segment.addr <= p && p + n <= h.segment.end()).then(|| WindowRef {
                offset: p - h.segment.addr,
                ..h
            })
        });
        if let Some(h) = hit {
            return Ok(h);
        }
        let r = al.window_of(c, p, n).map_err(WindowError::from);
        if let Ok(h) = r {
            cache.lock().unwrap().push((c, h));
        }
        r
    };
    let r = race_lookups_with_frees(stale, 20);
    assert!(
        r.violations
            .iter()
            .any(|v| v.contains("deregistration began at")),
        "the check missed a stale window: {r:?}"
    );
}

/// The raw-handle index under churn: two comms are attached and detached in
/// turn (so they keep taking each other's slot of the index) while lookups
/// by raw handle run; every window returned was registered on that very
/// handle and was not being deregistered before the lookup began. More
/// than 64 comms attached at once spill out of the index and are still
/// found.
#[test]
fn window_of_raw_under_attach_detach_churn() {
    let world = SimWorld::new(1);
    let al = Allocator::new(world.rank(0).unwrap());
    let p = al.alloc(2 * MIB, 0).unwrap();
    let raws = [
        world.comm_create(&[0]).unwrap()[0],
        world.comm_create(&[0]).unwrap()[0],
    ];
    let clock = Arc::new(AtomicU64::new(1));
    let dereg_at: Arc<Mutex<HashMap<Window, u64>>> = Arc::default();
    {
        let (clock, dereg_at) = (clock.clone(), dereg_at.clone());
        world.set_hook(Some(Arc::new(move |call: &SimCall| {
            if let (SimOp::Deregister, Some(w)) = (call.op, call.window) {
                // SeqCst: one total order with the lookups' stamps.
                let t = clock.fetch_add(1, Ordering::SeqCst);
                dereg_at.lock().unwrap().insert(w, t);
            }
        })));
    }
    let done = AtomicBool::new(false);
    let (found, unknown) = (AtomicU64::new(0), AtomicU64::new(0));
    let violations: Mutex<Vec<String>> = Mutex::default();
    let returned: Mutex<HashSet<(RawComm, Window)>> = Mutex::default();
    thread::scope(|s| {
        s.spawn(|| {
            // At least 400 cycles, and on until the lookups have seen both
            // answers (a loaded machine may not schedule the lookup thread
            // at first), within a bound.
            let start = std::time::Instant::now();
            let mut i = 0;
            while i < 400
                || (found.load(Ordering::Relaxed) == 0 || unknown.load(Ordering::Relaxed) == 0)
                    && start.elapsed() < std::time::Duration::from_secs(20)
            {
                let raw = raws[i % 2];
                let c = al.attach(raw).unwrap();
                al.register(c).unwrap();
                thread::yield_now();
                al.detach(c).unwrap();
                i += 1;
            }
            done.store(true, Ordering::SeqCst);
        });
        s.spawn(|| {
            let mut i = 0;
            while !done.load(Ordering::SeqCst) {
                i += 1;
                let raw = raws[i % 2];
                // SeqCst: see the hook.
                let t0 = clock.fetch_add(1, Ordering::SeqCst);
                match al.window_of_raw(raw, p + 64, 64) {
                    Ok(hit) => {
                        found.fetch_add(1, Ordering::Relaxed);
                        returned.lock().unwrap().insert((raw, hit.window));
                        if !world.windows_on(raw).contains(&hit.window) {
                            match dereg_at.lock().unwrap().get(&hit.window) {
                                Some(&d) if d > t0 => {}
                                d => violations.lock().unwrap().push(format!(
                                    "{raw:?} at {t0}: {:?}, deregistration began at {d:?}",
                                    hit.window
                                )),
                            }
                        }
                    }
                    Err(
                        WindowError::UnknownComm(_)
                        | WindowError::Lookup(WindowLookupError::NotAttached(_)),
                    ) => {
                        unknown.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(WindowError::Lookup(WindowLookupError::NotRegistered { .. })) => {}
                    Err(e) => violations.lock().unwrap().push(format!("unexpected {e:?}")),
                }
            }
        });
    });
    world.set_hook(None);
    let v = violations.into_inner().unwrap();
    assert!(v.is_empty(), "{v:#?}");
    // Every window returned was issued on the handle it was asked for.
    let issued: HashMap<Window, RawComm> = world
        .trace()
        .iter()
        .filter(|e| e.op == SimOp::Register && e.ok)
        .filter_map(|e| e.window.map(|w| (w, e.comm)))
        .collect();
    for (raw, w) in returned.into_inner().unwrap() {
        assert_eq!(issued.get(&w), Some(&raw), "{w:?}");
    }
    let (found, unknown) = (found.into_inner(), unknown.into_inner());
    println!("churn: {found} found, {unknown} not attached");
    assert!(found > 0 && unknown > 0);

    // 70 comms at once: the last ones have no slot, and are found anyway.
    let many: Vec<(RawComm, CommId)> = (0..70)
        .map(|_| {
            let raw = world.comm_create(&[0]).unwrap()[0];
            (raw, al.attach(raw).unwrap())
        })
        .collect();
    for &(raw, c) in &many {
        al.register(c).unwrap();
        assert_eq!(
            al.window_of_raw(raw, p, 8),
            al.window_of(c, p, 8).map_err(WindowError::from)
        );
        assert!(al.window_of_raw(raw, p, 8).is_ok());
    }
    for &(raw, c) in &many {
        al.detach(c).unwrap();
        assert_eq!(
            al.window_of_raw(raw, p, 8),
            Err(WindowError::UnknownComm(raw))
        );
        world.comm_destroy(raw).unwrap();
    }
    // Slots and spill count are back to empty: a new comm is found.
    let raw = world.comm_create(&[0]).unwrap()[0];
    let c = al.attach(raw).unwrap();
    al.register(c).unwrap();
    assert!(al.window_of_raw(raw, p, 8).is_ok());
    al.detach(c).unwrap();
    world.comm_destroy(raw).unwrap();
    al.free(p).unwrap();
    for r in raws {
        world.comm_destroy(r).unwrap();
    }
    assert_clean(&world);
}

/// `detach_all` detaches every comm in attach order and reports each one's
/// deregistrations.
#[test]
fn detach_all_reports_every_comm_in_attach_order() {
    let world = SimWorld::new(1);
    let al = Allocator::new(world.rank(0).unwrap());
    let raws: Vec<_> = (0..2)
        .map(|_| world.comm_create(&[0]).unwrap()[0])
        .collect();
    let ids: Vec<_> = raws.iter().map(|&r| al.attach(r).unwrap()).collect();
    al.alloc(2 * MIB, 0).unwrap();
    assert_eq!(al.register(ids[0]).unwrap().windows, 1);
    let reports: Vec<_> = al
        .detach_all()
        .into_iter()
        .map(|(id, r)| (id, r.unwrap().deregistered))
        .collect();
    assert_eq!(reports, [(ids[0], 1), (ids[1], 0)]);
    assert!(al.comms().is_empty());
    assert_eq!(world.stats().live_windows, 0);
    al.free_all();
    for raw in raws {
        world.comm_destroy(raw).unwrap();
    }
    assert!(world.verify().is_empty(), "{:?}", world.verify());
}

/// A comm's symmetric support is unknown until a registration answers: an
/// empty pass says nothing, a window says yes.
#[test]
fn symmetric_support_is_known_only_once_a_registration_answers() {
    let world = SimWorld::new(1);
    let al = Allocator::new(world.rank(0).unwrap());
    let raw = world.comm_create(&[0]).unwrap()[0];
    let id = al.attach(raw).unwrap();
    assert_eq!(al.stats().comms[0].symmetric, None);
    assert!(!al.stats().comms[0].abortable, "borrowed and blocking");
    assert_eq!(al.register(id).unwrap().windows, 0);
    assert_eq!(al.stats().comms[0].symmetric, None, "an empty pass");
    al.alloc(2 * MIB, 0).unwrap();
    assert_eq!(al.register(id).unwrap().windows, 1);
    assert_eq!(al.stats().comms[0].symmetric, Some(true));
    al.free_all();
    al.detach(id).unwrap();
    world.comm_destroy(raw).unwrap();
    assert!(world.verify().is_empty(), "{:?}", world.verify());
}
