//! The two-rank workload of `segment-registry-two-ranks` (issue 8) on the
//! simulated NCCL: the very program the GPUs run (`src/bin/two_ranks/
//! workload.rs`), with 2 simulated ranks, one thread each, and two comms A
//! and B sharing each rank's one allocator (pool). Allocate, pass A, pass
//! B, free (deregistering first), re-allocate at the freed addresses, pass
//! A, pass B, free, for several cycles. The simulator checks NCCL's rules
//! across the ranks; the per-rank registration logs must be identical.
//! Negative controls: a rank that allocates in another order is caught.
#![cfg(not(feature = "loom"))]

mod common;
#[path = "../src/bin/two_ranks/workload.rs"]
mod workload;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::thread;

use common::{assert_clean, assert_deregistered_before_free, MIB};
use segment_registry_nccl::sim::{set_alloc_site, Mismatch, SimBackend, SimWorld, Violation};
use segment_registry_nccl::{Allocator, RawComm};
use workload::{compare_logs, Env, Plan, Report, Traced, COMMS, REGION1, REGION2};

/// One simulated rank: its allocator on the rank's backend.
struct SimEnv {
    al: Allocator<Traced<SimBackend>>,
    rank: usize,
    nranks: usize,
}

impl Env for SimEnv {
    type B = SimBackend;

    fn allocator(&self) -> &Allocator<Traced<SimBackend>> {
        &self.al
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn nranks(&self) -> usize {
        self.nranks
    }

    fn device(&self) -> i32 {
        0
    }

    fn label(&self, buffer: &str) {
        // The simulator names each buffer (site, number): ranks that
        // register different buffers at the same position are reported.
        set_alloc_site(Some(buffer));
    }
}

struct Job {
    world: Arc<SimWorld>,
    /// Per comm (A, B): each rank's raw handle.
    raws: [Vec<RawComm>; 2],
    /// Per comm: the simulator's id.
    comm_ids: [u64; 2],
    /// Per rank: the workload's outcome.
    reports: Vec<Result<Report, String>>,
}

impl Job {
    /// Runs `plans[r]` on rank `r`, all ranks at once, one thread each.
    fn run(plans: &[Plan]) -> Job {
        let n = plans.len();
        let world = SimWorld::new(n);
        let all: Vec<usize> = (0..n).collect();
        let raws = [
            world.comm_create(&all).unwrap(),
            world.comm_create(&all).unwrap(),
        ];
        let comm_ids = [
            world.comm_id(raws[0][0]).unwrap(),
            world.comm_id(raws[1][0]).unwrap(),
        ];
        let reports = thread::scope(|s| {
            let handles: Vec<_> = plans
                .iter()
                .enumerate()
                .map(|(r, plan)| {
                    let (world, raws) = (&world, &raws);
                    s.spawn(move || {
                        let env = SimEnv {
                            al: Allocator::new(Traced::new(world.rank(r).unwrap())),
                            rank: r,
                            nranks: n,
                        };
                        let (rep, out) =
                            workload::run(&env, [raws[0][r], raws[1][r]], plan, &|_| {});
                        set_alloc_site(None);
                        out.map(|()| rep)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("rank panicked".into())))
                .collect()
        });
        Job {
            world,
            raws,
            comm_ids,
            reports,
        }
    }

    /// Registrations per member of each comm, as the simulator counted.
    fn registration_counts(&self) -> [Vec<(usize, usize)>; 2] {
        self.comm_ids.map(|id| self.world.registration_counts(id))
    }

    /// Destroys every comm (the workload detached them).
    fn destroy(&self) {
        for per_rank in &self.raws {
            for &c in per_rank {
                self.world.comm_destroy(c).unwrap();
            }
        }
    }

    fn report(&self, r: usize) -> &Report {
        match &self.reports[r] {
            Ok(rep) => rep,
            Err(e) => panic!("rank {r} failed: {e}"),
        }
    }
}

fn plan(cycles: usize) -> Plan {
    Plan { cycles, swap: None }
}

/// Registrations per rank and comm for `cycles` cycles: p once, then
/// region 1 and region 2 in every cycle.
fn registrations_per_comm(cycles: usize) -> usize {
    1 + cycles * (REGION1.len() + REGION2.len())
}

#[test]
fn two_ranks_two_comms_one_pool_same_registrations_no_violation() {
    const CYCLES: usize = 12;
    let job = Job::run(&[plan(CYCLES), plan(CYCLES)]);
    let (r0, r1) = (job.report(0), job.report(1));

    // Identical logs: same count, same order (comm, seq, size, buffer).
    let n = compare_logs((0, &r0.log_lines()), (1, &r1.log_lines())).unwrap();
    assert_eq!(n, COMMS.len() * registrations_per_comm(CYCLES));
    // The simulator agrees: each comm's members made the same number of
    // registrations, with no mismatch at any position.
    let per = registrations_per_comm(CYCLES);
    for counts in job.registration_counts() {
        assert_eq!(counts, vec![(0, per), (1, per)]);
    }
    let v = job.world.verify();
    assert!(v.is_empty(), "violations: {v:#?}");

    // The shape of the log: per region, A's whole pass then B's, each in
    // track order; cycle 1's first pass starts with p.
    let first: Vec<String> = r0
        .lines
        .iter()
        .take_while(|l| l.cycle == 1 && l.pass == 1)
        .map(|l| format!("{}:{}", l.comm, l.buffer))
        .collect();
    assert_eq!(
        first,
        ["A:p", "A:x", "A:y", "A:z", "A:w", "B:p", "B:x", "B:y", "B:z", "B:w"]
    );
    let mut last_seq = std::collections::HashMap::new();
    for l in &r0.lines {
        // Per comm, seqs strictly increase: never a segment twice, and a
        // re-allocated address is a new segment (new seq).
        let prev = last_seq.insert(l.comm, l.seq);
        assert!(prev.is_none_or(|p| p < l.seq), "{l} after seq {prev:?}");
    }

    // Re-allocations got the freed addresses back (the simulator's
    // ncclMemAlloc hands the lowest free range out again).
    for rep in [r0, r1] {
        assert_eq!(rep.reallocs, CYCLES * REGION2.len());
        assert_eq!(rep.reused, rep.reallocs);
        // Every free deregistered both windows at once, before
        // ncclMemFree (checked by the workload; the trace checks below).
        assert_eq!(rep.frees_checked, 1 + CYCLES * 6);
        // Counts level off: the same figures after every cycle.
        assert_eq!(rep.cycles.len(), CYCLES);
        let shapes: BTreeSet<_> = rep
            .cycles
            .iter()
            .map(|c| {
                (
                    c.live_segments,
                    c.live_windows,
                    c.unreturned,
                    c.outstanding_windows,
                )
            })
            .collect();
        assert_eq!(shapes.into_iter().collect::<Vec<_>>(), [(1, 2, 1, 2)]);
    }

    // Frees deregister first: in the simulator's trace, every window over
    // an allocation is deregistered before that allocation's ncclMemFree.
    assert_deregistered_before_free(&job.world.trace());
    job.destroy();
    assert_clean(&job.world);
    let s = job.world.stats();
    assert_eq!((s.live_allocs, s.live_windows, s.live_comms), (0, 0, 0));
    assert_eq!(s.windows_issued, (2 * COMMS.len() * per) as u64);
    assert_eq!(s.allocs, s.frees);
}

#[test]
fn counts_level_off_over_many_cycles() {
    // Long enough that any per-cycle growth (a window or a segment kept,
    // a registration repeated) would show; the world's live figures after
    // the run are zero and each rank's figures are flat from cycle 1 on.
    const CYCLES: usize = 60;
    let job = Job::run(&[plan(CYCLES), plan(CYCLES)]);
    for r in 0..2 {
        let rep = job.report(r);
        let first = &rep.cycles[0];
        for c in &rep.cycles {
            assert_eq!(
                (
                    c.live_segments,
                    c.live_windows,
                    c.unreturned,
                    c.outstanding_windows
                ),
                (
                    first.live_segments,
                    first.live_windows,
                    first.unreturned,
                    first.outstanding_windows
                ),
                "rank {r} cycle {}",
                c.cycle
            );
        }
        // Registrations per cycle are constant too: 6 per comm.
        for cycle in 2..=CYCLES {
            let k = rep.lines.iter().filter(|l| l.cycle == cycle).count();
            assert_eq!(k, COMMS.len() * 6, "rank {r} cycle {cycle}");
        }
    }
    compare_logs(
        (0, &job.report(0).log_lines()),
        (1, &job.report(1).log_lines()),
    )
    .unwrap();
    job.destroy();
    assert_clean(&job.world);
    assert_eq!(job.world.stats().live_allocs, 0);
}

/// Negative control: rank 1 allocates region 1's x (2 MiB) and y (4 MiB)
/// in the opposite order. Each rank's own run is fine, but the collective
/// registrations differ: the simulator reports a size mismatch on both
/// comms, and the log comparison names the first differing registration.
#[test]
fn control_a_rank_allocating_in_another_order_is_a_size_mismatch() {
    let swapped = Plan {
        cycles: 2,
        swap: Some((0, 1)),
    };
    let job = Job::run(&[plan(2), swapped]);
    let (r0, r1) = (job.report(0), job.report(1));
    let err = compare_logs((0, &r0.log_lines()), (1, &r1.log_lines())).unwrap_err();
    // Registration 1 is p; the 2nd is x on rank 0, y on rank 1.
    assert!(err.contains("registration 2 differs"), "{err}");
    assert!(
        err.contains("size=2097152 buf=x") && err.contains("size=4194304 buf=y"),
        "{err}"
    );

    let v = job.world.verify();
    let kinds: BTreeSet<&str> = v.iter().map(Violation::kind).collect();
    assert!(kinds.contains("collective-size"), "{v:#?}");
    assert!(
        kinds.iter().all(|k| k.starts_with("collective-")),
        "only collective mismatches expected: {v:#?}"
    );
    for (c, &id) in job.comm_ids.iter().enumerate() {
        let sizes = v.iter().find_map(|x| match x {
            Violation::CollectiveMismatch {
                comm,
                index: 1,
                what: Mismatch::Size { first, other },
                ..
            } if *comm == id => Some(BTreeSet::from([*first, *other])),
            _ => None,
        });
        assert_eq!(
            sizes,
            Some(BTreeSet::from([2 * MIB, 4 * MIB])),
            "comm {}: the 2nd registration differs in size: {v:#?}",
            COMMS[c]
        );
    }
    // Counts still agree: only the order differs.
    for counts in job.registration_counts() {
        assert_eq!(counts[0].1, counts[1].1);
    }
    job.destroy();
}

/// Negative control: rank 1 swaps x and z, both 2 MiB. Sizes match at
/// every position, so a log of (comm, seq, size) alone would not see it;
/// the simulator compares buffers (allocation site and number) and
/// reports an order mismatch, and the log's buffer names differ.
#[test]
fn control_same_size_buffers_swapped_is_an_order_mismatch() {
    let swapped = Plan {
        cycles: 1,
        swap: Some((0, 2)),
    };
    let job = Job::run(&[plan(1), swapped]);
    let (l0, l1) = (job.report(0).log_lines(), job.report(1).log_lines());
    let err = compare_logs((0, &l0), (1, &l1)).unwrap_err();
    assert!(err.contains("buf=x") && err.contains("buf=z"), "{err}");
    let strip = |v: &[String]| -> Vec<String> {
        v.iter()
            .map(|l| l.split(" buf=").next().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(
        strip(&l0),
        strip(&l1),
        "(comm, seq, size) alone is blind to this swap"
    );

    let v = job.world.verify();
    let orders = v.iter().filter(|x| x.kind() == "collective-order").count();
    // x and z swapped: positions 2 and 4 of cycle 1's first pass, on both
    // comms.
    assert_eq!(orders, 2 * COMMS.len(), "{v:#?}");
    assert!(v.iter().all(|x| x.kind() == "collective-order"), "{v:#?}");
    job.destroy();
}

/// Negative control of the checker the GPU run relies on: [`Traced`]
/// reports memory freed while a window covers it, a duplicate
/// registration, and a deregistration of an unknown window.
#[test]
fn control_traced_backend_reports_free_before_deregister() {
    use segment_registry_nccl::{Backend, NCCL_WIN_COLL_SYMMETRIC};
    let world = SimWorld::new(1);
    let comm = world.comm_create(&[0]).unwrap()[0];
    let t = Traced::new(world.rank(0).unwrap());
    let p = t.mem_alloc(2 * MIB, 0).unwrap();
    let w = t
        .comm_window_register(comm, p, 2 * MIB, NCCL_WIN_COLL_SYMMETRIC)
        .unwrap()
        .unwrap();
    let calls = t.take_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!((calls[0].comm, calls[0].ptr, calls[0].ok), (comm, p, true));
    let w2 = t
        .comm_window_register(comm, p, 2 * MIB, NCCL_WIN_COLL_SYMMETRIC)
        .unwrap()
        .unwrap();
    t.mem_free(p).unwrap(); // the bug: no deregistration first
    let v = t.violations();
    assert_eq!(v.len(), 3, "{v:#?}");
    assert!(v[0].contains("duplicate registration"), "{v:#?}");
    assert!(
        v[1..].iter().all(|m| m.contains("still covers it")),
        "{v:#?}"
    );
    t.comm_window_deregister(comm, w).unwrap();
    t.comm_window_deregister(comm, w2).unwrap();
    assert_eq!(t.live(), (0, 0));
    // The simulator saw the same breaches.
    let kinds: BTreeSet<&str> = world.verify().iter().map(Violation::kind).collect();
    assert!(kinds.contains("freed-while-registered") && kinds.contains("duplicate-registration"));
    world.comm_destroy(comm).unwrap();
}
