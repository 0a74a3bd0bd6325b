//! Checked passes with simulated ranks on threads: every rank's pass
//! agrees on a digest of what it would register, over a private comm split
//! at attach, before it registers anything. Each property comes with its
//! negative control: the same scenario with a deliberately broken variant
//! (`TestFaults`), which the property check must reject. Every wait is
//! bounded: by the comm's deadline, or by the harness's watchdog, which
//! releases every simulated call it finds waiting and reports a hang.
#![cfg(not(feature = "loom"))]

mod common;

use std::time::{Duration, Instant};

use common::ranks::Ranks;
use common::MIB;
use segment_registry_nccl::sim::{set_alloc_site, SimBackend, SimOp, SimWorld};
use segment_registry_nccl::{Allocator, BackendError, CommState, RegisterError, TestFaults};

/// Every rank allocates `n` segments of 2 MiB; `extra` ranks one more,
/// from an allocation site of its own (the simulator names buffers by site
/// and number, so the others keep matching numbers).
fn alloc_each(a: &Allocator<SimBackend>, r: usize, n: usize, extra: &[usize]) -> Vec<usize> {
    let mut out: Vec<usize> = (0..n).map(|_| a.alloc(2 * MIB, 0).unwrap()).collect();
    if extra.contains(&r) {
        set_alloc_site(Some("extra"));
        out.push(a.alloc(2 * MIB, 0).unwrap());
        set_alloc_site(None);
    }
    out
}

#[test]
fn a_checked_attach_is_collective_and_a_matching_pass_registers() {
    let job = Ranks::new(3, Duration::from_secs(5), TestFaults::default());
    let got = job
        .run(|r, a, id| {
            alloc_each(a, r, 2, &[]);
            a.register(id)
        })
        .unwrap();
    for (r, p) in got.into_iter().enumerate() {
        assert_eq!(p.unwrap().windows, 2, "rank {r}");
    }
    // Nothing pending: every rank still takes part, and all agree.
    let empty = job.run(|_, a, id| a.register(id)).unwrap();
    assert!(empty
        .iter()
        .all(|p| p.as_ref().unwrap().registered.is_empty()));
    for a in &job.allocs {
        let s = a.stats();
        assert_eq!((s.agreements, s.diverged), (2, 0), "{s:?}");
        assert!(s.comms[0].checked);
    }
    job.finish();
}

/// The divergence property: one rank has an extra segment; every rank's
/// pass returns `Diverged` with nothing registered, and once the extra is
/// freed the next pass registers on every rank. `Err` says where it fails.
fn divergence_is_caught(faults: TestFaults) -> Result<(), String> {
    let job = Ranks::new(2, Duration::from_millis(300), faults);
    // Rank 0 has nothing pending; rank 1 tracks one segment more.
    let extra = job
        .run(|r, a, id| {
            let mine = alloc_each(a, r, 0, &[1]);
            (mine, a.register(id))
        })
        .map_err(|e| format!("first pass: {e}"))?;
    for (r, (_, pass)) in extra.iter().enumerate() {
        match pass {
            Err(RegisterError::Diverged(d)) => {
                let want = if r == 0 {
                    "this rank has 0 pending segments (0 MiB); the group has 0 to 1; free or \
                     allocate so every rank matches, then register again"
                } else {
                    "this rank has 1 pending segment (2 MiB); the group has 0 to 1; free or \
                     allocate so every rank matches, then register again"
                };
                let msg = RegisterError::Diverged(d.clone()).to_string();
                if !msg.contains(want) {
                    return Err(format!("rank {r}: the message {msg:?} lacks {want:?}"));
                }
            }
            other => return Err(format!("rank {r}: expected Diverged, got {other:?}")),
        }
    }
    if job.world.stats().windows_issued != 0 {
        return Err("a divergent pass registered something".into());
    }
    // Rank 1 frees its extra; every rank allocates one; the pass matches.
    let again = job
        .run(|r, a, id| {
            for p in &extra[r].0 {
                a.free(*p).unwrap();
            }
            alloc_each(a, r, 1, &[]);
            a.register(id)
        })
        .map_err(|e| format!("second pass: {e}"))?;
    for (r, p) in again.iter().enumerate() {
        match p {
            Ok(s) if s.windows == 1 => {}
            other => return Err(format!("rank {r}: the matching pass gave {other:?}")),
        }
    }
    job.finish();
    Ok(())
}

#[test]
fn a_divergent_pass_is_diverged_on_every_rank_and_the_next_matching_pass_succeeds() {
    divergence_is_caught(TestFaults::default()).unwrap();
}

#[test]
fn control_an_agreement_skipped_when_nothing_is_pending_misses_the_divergence() {
    let faults = TestFaults {
        skip_agree_when_empty: true,
        ..TestFaults::default()
    };
    let e = divergence_is_caught(faults).unwrap_err();
    // Rank 0 returned at once; rank 1 waited for it until the deadline.
    assert!(e.contains("rank 0: expected Diverged, got Ok"), "{e}");
}

/// The skip property: rank 1's pass goes ahead without the group (its
/// agreement is skipped), so its next pass meets the others' previous one:
/// the pass counts differ, every rank gets `Diverged`, counts resync, and
/// the next pass matches.
fn a_skip_is_caught_by_the_pass_count(
    faults: TestFaults,
    deadline: Duration,
) -> Result<(), String> {
    let job = Ranks::new(2, deadline, faults);
    job.world
        .skip_next(job.agreement(1), SimOp::AllReduce)
        .unwrap();
    let got = job
        .run(|r, a, id| {
            let mut outcomes = vec![a.register(id)]; // nothing pending yet
            a.alloc(2 * MIB, 0).unwrap();
            outcomes.push(a.register(id));
            if r == 1 {
                // Rank 1 was told at its second pass: it runs it again.
                outcomes.push(a.register(id));
            }
            outcomes
        })
        .map_err(|e| format!("passes: {e}"))?;
    let caught = |r: usize, p: &Result<_, RegisterError>| match p {
        Err(RegisterError::Diverged(d)) if d.group.min.passes + 1 == d.group.max.passes => Ok(()),
        other => Err(format!(
            "rank {r}: expected Diverged by the pass count, got {other:?}"
        )),
    };
    caught(0, &got[0][0])?;
    caught(1, &got[1][1])?;
    for (r, i) in [(0, 1), (1, 2)] {
        match &got[r][i] {
            Ok(s) if s.windows == 1 => {}
            other => return Err(format!("rank {r}: the resynced pass gave {other:?}")),
        }
    }
    job.finish();
    Ok(())
}

#[test]
fn a_skipped_pass_is_caught_by_the_pass_count() {
    a_skip_is_caught_by_the_pass_count(TestFaults::default(), Duration::from_secs(5)).unwrap();
}

#[test]
fn control_with_empty_passes_skipping_the_agreement_the_skip_goes_unseen() {
    let faults = TestFaults {
        skip_agree_when_empty: true,
        ..TestFaults::default()
    };
    // Rank 0 ends up waiting for a pass rank 1 never makes: a short
    // deadline keeps the control fast.
    let e = a_skip_is_caught_by_the_pass_count(faults, Duration::from_millis(300)).unwrap_err();
    assert!(e.contains("expected Diverged by the pass count"), "{e}");
}

/// The abstain property: rank 1 cannot register (it abstains, or its comm
/// failed); the others' pass ends `Diverged` long before the deadline.
fn an_abstainer_makes_every_rank_fail_fast(
    faults: TestFaults,
    by_failure: bool,
    deadline: Duration,
) -> Result<(), String> {
    let job = Ranks::new(3, deadline, faults);
    if by_failure {
        // Rank 1's next registration fails: its comm is failed.
        job.world.fail_nth(1, SimOp::Register, 1);
        let first = job
            .run(|r, a, id| {
                alloc_each(a, r, 1, &[]);
                a.register(id)
            })
            .map_err(|e| format!("first pass: {e}"))?;
        if !matches!(first[1], Err(RegisterError::Register { .. })) {
            return Err(format!(
                "rank 1's registration did not fail: {:?}",
                first[1]
            ));
        }
    }
    let start = Instant::now();
    let got = job
        .run(|r, a, id| {
            if r == 1 && !by_failure {
                Err(a.abstain(id))
            } else {
                a.register(id)
            }
        })
        .map_err(|e| format!("abstain pass: {e}"))?;
    let took = start.elapsed();
    for (r, p) in got.iter().enumerate() {
        let ok = match p {
            Err(RegisterError::Diverged(d)) => d.group.max.abstain == 1,
            Err(RegisterError::Failed { .. }) => r == 1 && by_failure,
            _ => false,
        };
        if !ok {
            return Err(format!(
                "rank {r}: expected Diverged (a rank abstained), got {p:?}"
            ));
        }
    }
    if took >= deadline {
        return Err(format!(
            "the ranks took {took:?}, not less than the deadline"
        ));
    }
    if by_failure {
        assert_eq!(job.allocs[1].stats().comms[0].state, CommState::Failed);
    }
    job.finish();
    Ok(())
}

#[test]
fn an_abstaining_rank_makes_every_rank_fail_fast() {
    an_abstainer_makes_every_rank_fail_fast(TestFaults::default(), false, Duration::from_secs(5))
        .unwrap();
}

#[test]
fn a_rank_whose_comm_failed_abstains_and_every_rank_fails_fast() {
    an_abstainer_makes_every_rank_fail_fast(TestFaults::default(), true, Duration::from_secs(5))
        .unwrap();
}

#[test]
fn control_a_failed_rank_that_skips_instead_of_abstaining_leaves_its_peers_to_the_deadline() {
    let faults = TestFaults {
        no_abstain_when_failed: true,
        ..TestFaults::default()
    };
    let e = an_abstainer_makes_every_rank_fail_fast(faults, true, Duration::from_millis(300))
        .unwrap_err();
    assert!(
        e.contains("expected Diverged (a rank abstained), got Err(Agreement"),
        "{e}"
    );
}

/// The lost-agreement property: every rank's agreement all-reduce never
/// completes; each rank's pass ends at the deadline with an `Agreement`
/// error that names the call and the time waited, nothing registered, the
/// comm failed, and detach still deregisters what it holds.
fn a_lost_agreement_ends_at_the_deadline(faults: TestFaults) -> Result<(), String> {
    let deadline = Duration::from_millis(150);
    let mut job = Ranks::new(2, deadline, faults);
    // Ten deadlines: ample for the ranks to end, short for a hang.
    job.watchdog = deadline * 10;
    // One registered segment per rank first.
    job.run(|r, a, id| {
        alloc_each(a, r, 1, &[]);
        a.register(id).unwrap();
    })
    .unwrap();
    for r in 0..2 {
        job.world
            .stall_next(job.agreement(r), SimOp::AllReduce)
            .unwrap();
    }
    let got = job
        .run(|r, a, id| {
            alloc_each(a, r, 1, &[]);
            a.register(id)
        })
        .map_err(|e| format!("stalled pass: {e}"))?;
    for (r, p) in got.iter().enumerate() {
        match p {
            Err(RegisterError::Agreement {
                source: BackendError::Timeout { call, waited, .. },
                ..
            }) if *call == "ncclAllReduce" && *waited >= deadline => {}
            other => {
                return Err(format!(
                    "rank {r}: expected a timed-out agreement, got {other:?}"
                ))
            }
        }
    }
    for (r, a) in job.allocs.iter().enumerate() {
        let c = &a.stats().comms[0];
        if c.state != CommState::Failed || c.pending != 1 || c.windows != 1 {
            return Err(format!("rank {r}: {c:?}"));
        }
    }
    job.finish();
    Ok(())
}

#[test]
fn a_lost_agreement_ends_at_the_deadline_with_a_timeout() {
    a_lost_agreement_ends_at_the_deadline(TestFaults::default()).unwrap();
}

#[test]
fn control_an_ignored_deadline_hangs_the_lost_agreement() {
    let faults = TestFaults {
        ignore_deadline: true,
        ..TestFaults::default()
    };
    let e = a_lost_agreement_ends_at_the_deadline(faults).unwrap_err();
    assert!(e.contains("stalled pass: ranks [0, 1] still waited"), "{e}");
}

#[test]
fn an_unchecked_attach_makes_no_collective_and_abstain_refuses_it() {
    let world = SimWorld::new(1);
    let a = Allocator::new(world.rank(0).unwrap());
    let id = a.attach(world.comm_create(&[0]).unwrap()[0]).unwrap();
    assert!(a.agreement_comm(id).is_none());
    assert!(matches!(a.abstain(id), RegisterError::NotChecked(c) if c == id));
    let s = world.stats();
    assert_eq!(
        (s.all_reduces, s.live_comms),
        (0, 1),
        "no split, no all-reduce"
    );
    assert!(!a.stats().comms[0].checked);
}

/// Runs one checked pass on two ranks that allocate `sizes[r]` (in MiB, in
/// that order) and returns each rank's `Diverged` message.
fn divergence_messages(sizes: [&[usize]; 2]) -> Vec<String> {
    let job = Ranks::new(2, Duration::from_secs(5), TestFaults::default());
    let passes = job
        .run(|r, a, id| {
            for &m in sizes[r] {
                a.alloc(m * MIB, 0).unwrap();
            }
            a.register(id)
        })
        .expect("the pass returns on both ranks");
    let msgs = passes
        .into_iter()
        .map(|p| match p {
            Err(e @ RegisterError::Diverged(_)) => e.to_string(),
            other => panic!("expected Diverged, got {other:?}"),
        })
        .collect();
    assert_eq!(job.world.stats().windows_issued, 0);
    job.finish();
    msgs
}

/// The message names what differs: the total size when the counts match,
/// and the lengths or their order when counts and totals match too.
#[test]
fn a_divergence_in_sizes_or_in_order_is_named_as_such() {
    let sizes = divergence_messages([&[2], &[4]]);
    assert!(
        sizes[0].ends_with(
            "this rank has 1 pending segment (2 MiB); the group has 1 segments of 2 MiB to \
             4 MiB in all; free or allocate so every rank matches, then register again"
        ),
        "{}",
        sizes[0]
    );
    let order = divergence_messages([&[2, 4], &[4, 2]]);
    assert!(
        order[1].ends_with(
            "this rank has 2 pending segments (6 MiB), as many and as large as the group's, \
             but of other lengths or in another order; allocate in the same order on every \
             rank, then register again"
        ),
        "{}",
        order[1]
    );
}

/// A checked attach splits a private agreement comm; detach releases it
/// (finalize and destroy), so only the application's comm is left.
#[test]
fn detach_releases_the_agreement_comm() {
    let world = SimWorld::new(1);
    let al = Allocator::new(world.rank(0).unwrap());
    let raw = world.comm_create(&[0]).unwrap()[0];
    let id = al
        .attach_with(raw, segment_registry_nccl::AttachOptions::new().checked())
        .unwrap();
    assert_eq!(
        world.stats().live_comms,
        2,
        "the comm and its agreement comm"
    );
    al.detach(id).unwrap();
    assert_eq!(world.stats().live_comms, 1, "the agreement comm is gone");
    world.comm_destroy(raw).unwrap();
    assert_eq!(world.stats().live_comms, 0);
    assert!(world.verify().is_empty(), "{:?}", world.verify());
}
