//! Checked passes (DESIGN.md, "checked pass"): ranks agree on the set
//! before anything is registered. Simulated ranks are registries on
//! threads whose agreement is an all-reduce with max through a shared
//! rendezvous, as the glue does it with NCCL.
#![cfg(not(feature = "loom"))]

use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use segment_registry::{CommError, CommId, Digest, DigestRange, PassError, Registry, Segment};

type Reg = Registry<&'static str, u64>;

const MB2: usize = 2 << 20;

fn seg_addr(i: usize) -> usize {
    0x7f00_0000_0000 + i * 4 * MB2
}

/// A group of one: the agreement is the rank's own digest.
fn alone(_: &&'static str, d: &Digest) -> Result<DigestRange, &'static str> {
    Ok(DigestRange::of_one(*d))
}

fn window(_: &&'static str, s: &Segment) -> Result<Option<u64>, &'static str> {
    Ok(Some(s.seq))
}

/// An agreement whose peers are `peer(d)`: the range of the two.
fn with_peer(
    peer: impl Fn(Digest) -> Digest,
) -> impl FnOnce(&&'static str, &Digest) -> Result<DigestRange, &'static str> {
    move |_, d| {
        let mut r = d.reduction_input();
        for (x, y) in r.iter_mut().zip(peer(*d).reduction_input()) {
            *x = (*x).max(y);
        }
        Ok(Digest::range_from_reduced(r))
    }
}

#[test]
fn checked_pass_digest_describes_exactly_the_set_it_registers() {
    let reg = Reg::new();
    let comm = reg.attach("tp");
    let segs: Vec<_> = [MB2, 3 * MB2, MB2]
        .iter()
        .enumerate()
        .map(|(i, &len)| reg.track(seg_addr(i), len).unwrap())
        .collect();
    let mut seen = None;
    let report = reg
        .register_pending_checked(
            comm,
            |_, d| {
                seen = Some(*d);
                Ok::<_, &str>(DigestRange::of_one(*d))
            },
            window,
        )
        .unwrap();
    assert_eq!(report.registered, segs);
    let d = seen.expect("agree was called");
    assert_eq!(d, Digest::of_set(1, &segs));
    assert_eq!(
        (d.abstain, d.passes, d.segments, d.bytes),
        (0, 1, 3, 5 * MB2 as u64)
    );
}

#[test]
fn checked_pass_with_nothing_pending_still_takes_part_in_the_agreement() {
    let reg = Reg::new();
    let comm = reg.attach("tp");
    let mut calls = Vec::new();
    for _ in 0..2 {
        let report = reg
            .register_pending_checked(
                comm,
                |_, d| {
                    calls.push(*d);
                    Ok::<_, &str>(DigestRange::of_one(*d))
                },
                window,
            )
            .unwrap();
        assert!(report.registered.is_empty());
    }
    assert_eq!(calls.len(), 2, "every checked pass reaches the agreement");
    assert_eq!(
        calls
            .iter()
            .map(|d| (d.passes, d.segments))
            .collect::<Vec<_>>(),
        vec![(1, 0), (2, 0)]
    );
}

#[test]
fn checked_pass_diverged_registers_nothing_and_the_next_matching_pass_does() {
    let reg = Reg::new();
    let comm = reg.attach("tp");
    let a = reg.track(seg_addr(0), MB2).unwrap();
    let before = reg.stats();
    let failure = reg
        .register_pending_checked(
            comm,
            with_peer(|d| Digest {
                segments: d.segments + 1,
                bytes: d.bytes + MB2 as u64,
                ..d
            }),
            window,
        )
        .unwrap_err();
    let PassError::Diverged(d) = failure.error else {
        panic!("expected Diverged, got {:?}", failure.error)
    };
    assert_eq!(
        (d.local.segments, d.group.min.segments, d.group.max.segments),
        (1, 1, 2)
    );
    assert!(failure.report.registered.is_empty());
    let mut after = reg.stats();
    after.nodes.pass_steps = before.nodes.pass_steps; // the walk's cost figure
    assert_eq!(
        after, before,
        "a diverged pass changes nothing but the pass count"
    );
    assert_eq!(reg.pending(comm), Ok(1));
    let msg = d.to_string();
    assert!(
        msg.contains("this rank has 1 pending segments") && msg.contains("1 to 2 segments"),
        "{msg}"
    );
    // The ranks match again: it registers, as checked pass 2.
    let report = reg
        .register_pending_checked(
            comm,
            |_, d| {
                assert_eq!(d.passes, 2);
                Ok::<_, &str>(DigestRange::of_one(*d))
            },
            window,
        )
        .unwrap();
    assert_eq!(report.registered, vec![a]);
}

#[test]
fn checked_pass_a_skipped_pass_costs_one_diverged_then_counts_match() {
    let reg = Reg::new();
    let comm = reg.attach("tp");
    reg.track(seg_addr(0), MB2).unwrap();
    // The peers are one pass ahead: this rank skipped one.
    let failure = reg
        .register_pending_checked(
            comm,
            with_peer(|d| Digest {
                passes: d.passes + 1,
                ..d
            }),
            window,
        )
        .unwrap_err();
    assert!(matches!(failure.error, PassError::Diverged(d)
        if d.local.passes == 1 && d.group.max.passes == 2));
    // Every rank adopted the maximum: the next pass is number 3 everywhere.
    let report = reg
        .register_pending_checked(
            comm,
            |_, d| {
                assert_eq!(d.passes, 3);
                Ok::<_, &str>(DigestRange::of_one(*d))
            },
            window,
        )
        .unwrap();
    assert_eq!(report.registered.len(), 1);
}

#[test]
fn checked_pass_agreement_error_registers_nothing_and_local_errors_skip_it() {
    let reg = Reg::new();
    let comm = reg.attach("tp");
    reg.track(seg_addr(0), MB2).unwrap();
    let failure = reg
        .register_pending_checked(comm, |_, _| Err("timed out"), window)
        .unwrap_err();
    assert!(matches!(
        failure.error,
        PassError::Agreement {
            error: "timed out",
            ..
        }
    ));
    assert_eq!(reg.pending(comm), Ok(1));
    // Not attached: no agreement is attempted.
    let gone = CommId(99);
    let failure = reg
        .register_pending_checked(gone, |_, _| panic!("agree must not run"), window)
        .unwrap_err();
    assert!(matches!(failure.error, PassError::Comm(CommError::NotAttached(c)) if c == gone));
    // Busy: a checked pass inside a pass's callback on the same comm.
    let report = reg
        .register_pending(comm, |_, s| {
            let inner = reg
                .register_pending_checked(comm, |_, _| panic!("agree must not run"), window)
                .unwrap_err();
            assert!(matches!(inner.error, PassError::Comm(CommError::Busy(_))));
            Ok::<_, &str>(Some(s.seq))
        })
        .unwrap();
    assert_eq!(report.registered.len(), 1);
}

/// An all-reduce with max among `n` threads: each contributes its words,
/// waits for all, and reads the result (one round at a time).
struct Group {
    barrier: Barrier,
    acc: Mutex<[u64; 2 * Digest::WORDS]>,
}

impl Group {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Group {
            barrier: Barrier::new(n),
            acc: Mutex::new([0; 2 * Digest::WORDS]),
        })
    }

    fn agree(&self, d: &Digest) -> DigestRange {
        {
            let mut acc = self.acc.lock().unwrap();
            for (a, v) in acc.iter_mut().zip(d.reduction_input()) {
                *a = (*a).max(v);
            }
        }
        self.barrier.wait();
        let r = *self.acc.lock().unwrap();
        if self.barrier.wait().is_leader() {
            *self.acc.lock().unwrap() = [0; 2 * Digest::WORDS];
        }
        self.barrier.wait();
        Digest::range_from_reduced(r)
    }
}

#[test]
fn checked_pass_ranks_on_threads_diverge_together_then_recover() {
    let group = Group::new(2);
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let group = group.clone();
            thread::spawn(move || {
                let reg = Reg::new();
                let comm = reg.attach("tp");
                reg.track(seg_addr(0), MB2).unwrap();
                let extra = (rank == 1).then(|| reg.track(seg_addr(1), MB2).unwrap());
                let agree = |_: &&str, d: &Digest| Ok::<_, &str>(group.agree(d));
                let first = reg.register_pending_checked(comm, agree, window);
                let diverged =
                    matches!(first, Err(ref f) if matches!(f.error, PassError::Diverged(_)));
                if let Some(e) = extra {
                    let gone = reg.untrack(e.addr).unwrap();
                    assert!(gone.windows.is_empty(), "the extra was never registered");
                }
                let second = reg.register_pending_checked(comm, agree, window).unwrap();
                // One rank abstains: both fail fast.
                let third = if rank == 0 {
                    reg.abstain_checked(comm, agree).error
                } else {
                    reg.track(seg_addr(2), MB2).unwrap();
                    reg.register_pending_checked(comm, agree, window)
                        .unwrap_err()
                        .error
                };
                (
                    diverged,
                    second.registered.len(),
                    matches!(third, PassError::Diverged(d) if d.group.max.abstain == 1),
                    reg.pending(comm),
                )
            })
        })
        .collect();
    let out: Vec<_> = ranks.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(out[0], (true, 1, true, Ok(0)));
    assert_eq!(
        out[1],
        (true, 1, true, Ok(1)),
        "the abstained-on segment stays pending"
    );
}

#[test]
fn checked_pass_failure_report_is_empty_and_the_comm_is_not_left_busy() {
    let reg = Reg::new();
    let comm = reg.attach("tp");
    reg.track(seg_addr(0), MB2).unwrap();
    for _ in 0..3 {
        let f = reg
            .register_pending_checked(comm, with_peer(|d| Digest { segments: 0, ..d }), window)
            .unwrap_err();
        assert!(f.report.handed_back.is_empty() && f.report.free_now.is_empty());
    }
    let report = reg.register_pending_checked(comm, alone, window).unwrap();
    assert_eq!(report.registered.len(), 1);
}
