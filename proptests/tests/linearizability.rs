//! Linearizability of the real registry: random small concurrent
//! histories (3–4 threads released together from a barrier, a few
//! operations each, some with a pass whose callback parks while the other
//! threads track, untrack, forget and pass), each checked against the
//! sequential model by the Wing–Gong checker; and the checker's own
//! non-vacuity: hand-built histories with a known verdict, and known-bad
//! registries on scripted histories that show their bug every time.
//!
//! `LIN_HISTORIES` and `LIN_PARKED` set the number of random histories
//! (defaults 5,000 and 2,500, or half and a quarter of `PROPTEST_CASES`
//! where only that is set, as in the sanitizer run); `LIN_SEED` the first
//! seed.
#![cfg(not(feature = "loom"))]

use std::collections::BTreeSet;

use segment_registry::{CommError, CommId, Faults, Registry, Segment, TrackError};
use segment_registry_proptests::concurrent::{
    initial_model, random_plan, run_plan, run_plan_fresh, Plan, Recorder, Rng, SharedLedger, TOp,
};
use segment_registry_proptests::env_count;
use segment_registry_proptests::lin::{check, format_history, Clock, Event, History, Obs};
use segment_registry_proptests::model::{CbResult, Payload, Window};
use segment_registry_proptests::ops::{PassEnd, GRANULE};
use segment_registry_proptests::pausing::{PauseCtl, PausePoint, PausingIndex};

/// `var`, else `PROPTEST_CASES / div`, else `default`.
fn histories(var: &str, div: u32, default: u32) -> u32 {
    match std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        Some(cases) => env_count(var, (cases / div).max(1)),
        None => env_count(var, default),
    }
}

fn seed() -> u64 {
    std::env::var("LIN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed)
}

/// What a batch of histories exercised.
#[derive(Debug, Default)]
struct Coverage {
    histories: u32,
    events: usize,
    explored: usize,
    /// Windows a pass handed back (segment untracked or comm forgotten
    /// while it ran).
    handed_back: usize,
    /// Untracks that found a pass (or forget) holding the segment.
    untrack_held: usize,
    /// Passes refused as busy.
    busy: usize,
    /// Passes stopped because their comm was forgotten.
    forgotten: usize,
    /// Frees owed by a pass or a forget.
    pass_free_now: usize,
    /// Tracks rejected while an overlapping track ran.
    excused: usize,
}

impl Coverage {
    fn add(&mut self, h: &History) {
        self.histories += 1;
        for e in h.threads.iter().flatten() {
            self.events += 1;
            match &e.obs {
                Obs::PassAdd {
                    handed_back: true, ..
                } => self.handed_back += 1,
                Obs::Untrack { result: Ok(u), .. } if u.held => self.untrack_held += 1,
                Obs::PassClaim {
                    result: Err(CommError::Busy(_)),
                    ..
                } => self.busy += 1,
                Obs::PassUnbusy { end, free_now, .. } => {
                    self.forgotten += usize::from(matches!(end, PassEnd::Forgotten(_)));
                    self.pass_free_now += free_now.len();
                }
                Obs::Track {
                    result: Err(_),
                    excused: true,
                    ..
                } => self.excused += 1,
                _ => {}
            }
        }
    }
}

/// Runs `n` random histories and checks each.
fn random_histories(n: u32, parked: bool) -> Coverage {
    let base = seed();
    let mut cov = Coverage::default();
    for i in 0..n {
        let s = base
            .wrapping_add(u64::from(i))
            .wrapping_add(if parked { 1 << 32 } else { 0 });
        let mut rng = Rng::new(s);
        let threads = 3 + rng.below(2);
        let plan = random_plan(&mut rng, threads, parked);
        let rec = run_plan_fresh(Faults::NONE, &plan);
        if let Err(e) = &rec.ledger {
            panic!(
                "seed {s}: {e}\nplan: {plan:#?}\n{}",
                format_history(&rec.history)
            );
        }
        match check(&initial_model(), &rec.history) {
            Ok(n) => cov.explored += n,
            Err(e) => panic!("seed {s}: plan {plan:#?}\n{e}"),
        }
        cov.add(&rec.history);
    }
    cov
}

#[test]
fn random_histories_are_linearizable() {
    let cov = random_histories(histories("LIN_HISTORIES", 2, 5_000), false);
    eprintln!("{cov:#?}");
}

#[test]
fn histories_with_a_parked_pass_are_linearizable() {
    let n = histories("LIN_PARKED", 4, 2_500);
    let cov = random_histories(n, true);
    eprintln!("{cov:#?}");
    // Non-vacuity: with a parked pass the races it is about happen (these
    // do not depend on timing: the others run inside the callback).
    if n >= 500 {
        assert!(cov.handed_back > 0 && cov.untrack_held > 0, "{cov:#?}");
        assert!(
            cov.busy > 0 && cov.forgotten > 0 && cov.pass_free_now > 0,
            "{cov:#?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Hand-built histories: the checker's verdicts
// ---------------------------------------------------------------------------

fn ev(call: u64, ret: u64, obs: Obs) -> Event {
    Event { call, ret, obs }
}

fn seg(addr: usize, seq: u64) -> Segment {
    Segment {
        addr,
        len: GRANULE,
        seq,
    }
}

fn track(call: u64, ret: u64, addr: usize, result: Result<Segment, TrackError>) -> Event {
    ev(
        call,
        ret,
        Obs::Track {
            addr,
            len: GRANULE,
            result,
            excused: false,
        },
    )
}

fn find(call: u64, ret: u64, addr: usize, result: Option<Segment>) -> Event {
    ev(call, ret, Obs::Find { addr, result })
}

/// A pass on comm 1 over `segs` (all registered with windows 1, 2, …),
/// from `call` to `ret`, on one thread.
fn pass(call: u64, ret: u64, segs: &[Segment]) -> Vec<Event> {
    let c = CommId(1);
    let mut v = vec![
        ev(
            call,
            call + 1,
            Obs::PassClaim {
                comm: c,
                result: Ok(()),
            },
        ),
        ev(call, call + 1, Obs::PassFixEnd { comm: c }),
    ];
    for (k, s) in segs.iter().enumerate() {
        v.push(ev(
            call,
            ret,
            Obs::PassCheck {
                comm: c,
                next: Some(*s),
            },
        ));
        v.push(ev(
            call,
            ret,
            Obs::PassAdd {
                comm: c,
                cb: CbResult::Window(k as Window + 1),
                handed_back: false,
            },
        ));
        v.push(ev(call, ret, Obs::PassRelease { comm: c }));
    }
    v.push(ev(
        call,
        ret,
        Obs::PassCheck {
            comm: c,
            next: None,
        },
    ));
    v.push(ev(call, ret, Obs::PassFinishCursor { comm: c }));
    v.push(ev(
        call,
        ret,
        Obs::PassUnbusy {
            comm: c,
            end: PassEnd::Ok,
            registered: segs.to_vec(),
            handed_back: Vec::new(),
            free_now: Vec::new(),
        },
    ));
    v
}

fn attach(call: u64) -> Event {
    ev(
        call,
        call + 1,
        Obs::Attach {
            payload: 0,
            result: CommId(1),
        },
    )
}

#[test]
fn concurrent_find_may_miss_a_track_in_flight() {
    // t1 tracks A over [10, 20]; t2 finds nothing at 12 (before A took
    // effect) and A at 15.
    let h = History {
        threads: vec![
            vec![track(10, 20, 0, Ok(seg(0, 1)))],
            vec![find(11, 12, 0, None), find(15, 16, 0, Some(seg(0, 1)))],
        ],
    };
    check(&initial_model(), &h).expect("linearizable");
}

#[test]
fn find_after_track_returned_must_see_it() {
    let h = History {
        threads: vec![
            vec![track(10, 20, 0, Ok(seg(0, 1)))],
            vec![find(21, 22, 0, Some(seg(0, 1))), find(23, 24, 0, None)],
        ],
    };
    let e = check(&initial_model(), &h).expect_err("A is live from 20 on");
    assert!(e.to_string().contains("not linearizable"));
}

#[test]
fn find_that_sees_then_misses_a_live_segment_is_caught() {
    // Sees A, then misses it, with no untrack anywhere.
    let h = History {
        threads: vec![
            vec![track(10, 20, 0, Ok(seg(0, 1)))],
            vec![find(11, 12, 0, Some(seg(0, 1))), find(13, 14, 0, None)],
        ],
    };
    check(&initial_model(), &h).expect_err("nothing removed A");
}

#[test]
fn pass_must_include_a_segment_tracked_before_it_began() {
    // A and B are tracked before the pass is called; it registers only B.
    let mut t0 = vec![attach(1), track(2, 3, 0, Ok(seg(0, 1)))];
    t0.push(track(4, 5, 0x1000, Ok(seg(0x1000, 2))));
    let good = {
        let mut t = t0.clone();
        t.extend(pass(10, 20, &[seg(0, 1), seg(0x1000, 2)]));
        History { threads: vec![t] }
    };
    check(&initial_model(), &good).expect("the pass registers both, in seq order");
    let bad = {
        let mut t = t0;
        t.extend(pass(10, 20, &[seg(0x1000, 2)]));
        History { threads: vec![t] }
    };
    check(&initial_model(), &bad).expect_err("A was tracked before the pass began");
}

#[test]
fn pass_may_include_a_segment_whose_track_overlaps_it() {
    // B's track runs concurrently with the pass: either way is fine.
    let t0 = [attach(1), track(2, 3, 0, Ok(seg(0, 1)))];
    for included in [false, true] {
        let segs: Vec<Segment> = if included {
            vec![seg(0, 1), seg(0x1000, 2)]
        } else {
            vec![seg(0, 1)]
        };
        let h = History {
            threads: vec![
                t0.iter().cloned().chain(pass(10, 20, &segs)).collect(),
                vec![track(9, 15, 0x1000, Ok(seg(0x1000, 2)))],
            ],
        };
        check(&initial_model(), &h).expect("concurrent: either order");
    }
}

#[test]
fn rejected_overlap_needs_a_live_or_racing_segment() {
    let overlap = Err(TrackError::Overlap {
        addr: 0x800,
        len: GRANULE,
        other_addr: 0,
        other_len: GRANULE,
    });
    let alone = History {
        threads: vec![vec![track(1, 2, 0x800, overlap.clone())]],
    };
    check(&initial_model(), &alone).expect_err("nothing to overlap");
    let mut racing = History {
        threads: vec![
            vec![track(1, 4, 0x800, overlap)],
            vec![ev(
                2,
                3,
                Obs::Track {
                    addr: 0,
                    len: GRANULE,
                    result: Err(TrackError::Overlap {
                        addr: 0,
                        len: GRANULE,
                        other_addr: 0x800,
                        other_len: GRANULE,
                    }),
                    excused: false,
                },
            )],
        ],
    };
    segment_registry_proptests::lin::mark_excuses(&mut racing);
    check(&initial_model(), &racing).expect("both may lose an overlap race");
}

#[test]
fn busy_needs_a_running_pass() {
    let busy = ev(
        10,
        11,
        Obs::PassClaim {
            comm: CommId(1),
            result: Err(CommError::Busy(CommId(1))),
        },
    );
    let h = History {
        threads: vec![vec![attach(1), busy.clone()]],
    };
    check(&initial_model(), &h).expect_err("no pass runs");
    let h = History {
        threads: vec![
            vec![attach(1)]
                .into_iter()
                .chain(pass(5, 20, &[]))
                .collect(),
            vec![busy],
        ],
    };
    check(&initial_model(), &h).expect("a pass runs from 5 to 20");
}

// ---------------------------------------------------------------------------
// Known-bad registries on scripted histories
// ---------------------------------------------------------------------------

/// Thread A starts `track(X)` and parks inside it (in the index insert);
/// meanwhile the main thread tracks Y and runs a pass; then A goes on, and
/// after it returned, a second pass runs. With the naive cursor, A took
/// seq 1 before parking, Y got seq 2, the first pass raised the cursor to
/// 2, and the second pass skips X for good.
fn naive_script(faults: Faults) -> History {
    const X: usize = 0;
    const Y: usize = 0x4000;
    let ctl = PauseCtl::armed(PausePoint::Insert(X));
    PauseCtl::install(&ctl);
    let reg: Registry<Payload, Window, PausingIndex> = Registry::with_faults(faults);
    let clock = Clock::default();
    let ledger = SharedLedger::default();
    let mut main = Recorder::new(&reg, &clock, &ledger);
    let t0 = clock.now();
    let result = reg.attach(0);
    main.push(t0, clock.now(), Obs::Attach { payload: 0, result });
    let pass = TOp::Pass {
        comm: CommId(1),
        fail_at: None,
        no_window: 0,
        park: false,
    };
    let a_events = std::thread::scope(|s| {
        let a = s.spawn(|| {
            let mut r = Recorder::new(&reg, &clock, &ledger);
            r.run(
                &TOp::Track {
                    addr: X,
                    len: GRANULE,
                },
                None,
            );
            r.events
        });
        ctl.wait_parked();
        main.run(
            &TOp::Track {
                addr: Y,
                len: GRANULE,
            },
            None,
        );
        main.run(&pass, None);
        ctl.resume();
        a.join().unwrap()
    });
    main.run(&pass, None);
    let t0 = clock.now();
    let obs = Obs::Final {
        by_seq: reg.segments_by_seq(),
        pending: vec![(CommId(1), reg.pending(CommId(1)))],
        windows: Vec::new(),
    };
    main.push(t0, clock.now(), obs);
    History {
        threads: vec![main.events, a_events],
    }
}

#[test]
fn naive_cursor_is_not_linearizable() {
    let naive = Faults {
        naive_cursor: true,
        ..Faults::NONE
    };
    let h = naive_script(naive);
    let e = check(&initial_model(), &h).expect_err("the naive cursor misses X");
    eprintln!("{e}");
    // The same script on the shipped registry is linearizable.
    let h = naive_script(Faults::NONE);
    check(&initial_model(), &h).unwrap_or_else(|e| panic!("{e}"));
}

/// A pass parks in its callback on A while another thread untracks A.
fn untrack_during_pass_plan() -> Plan {
    Plan {
        setup: vec![TOp::Track {
            addr: 0,
            len: GRANULE,
        }],
        threads: vec![
            vec![TOp::Pass {
                comm: CommId(1),
                fail_at: None,
                no_window: 0,
                park: true,
            }],
            vec![TOp::Untrack { addr: 0 }],
        ],
        parked: true,
        jitter: 0,
    }
}

#[test]
fn unchecked_window_add_is_not_linearizable() {
    let bad = Faults {
        unchecked_window_add: true,
        ..Faults::NONE
    };
    let rec = run_plan_fresh(bad, &untrack_during_pass_plan());
    assert!(rec.ledger.is_err(), "the window is lost");
    check(&initial_model(), &rec.history).expect_err("the pass must hand the window back");
    let rec = run_plan_fresh(Faults::NONE, &untrack_during_pass_plan());
    rec.ledger.unwrap();
    check(&initial_model(), &rec.history).unwrap_or_else(|e| panic!("{e}"));
    // And the pass did hand it back, holding A until then.
    let passes: BTreeSet<bool> = rec.history.threads[1]
        .iter()
        .filter_map(|e| match &e.obs {
            Obs::PassAdd { handed_back, .. } => Some(*handed_back),
            _ => None,
        })
        .collect();
    assert_eq!(passes, BTreeSet::from([true]));
}

#[test]
fn parked_plan_runs_the_others_inside_the_callback() {
    let rec = run_plan(&Registry::new(), &untrack_during_pass_plan());
    let h = &rec.history;
    let untrack = h.threads[2]
        .iter()
        .find(|e| matches!(e.obs, Obs::Untrack { .. }))
        .expect("untrack ran");
    let check_ev = h.threads[1]
        .iter()
        .find(|e| matches!(e.obs, Obs::PassCheck { next: Some(_), .. }))
        .expect("callback ran");
    let add = h.threads[1]
        .iter()
        .find(|e| matches!(e.obs, Obs::PassAdd { .. }))
        .expect("callback returned");
    assert!(check_ev.ret < untrack.call && untrack.ret < add.call);
}

/// A forget that holds a segment and then finds its window taken by a
/// racing untrack (a "ghost" hold) explains an untrack that saw a hold and
/// the forget's `free_now`; without the forget, or with the free missing,
/// the same observations are rejected.
#[test]
fn forget_racing_untrack_needs_its_ghost_hold() {
    let a = seg(0, 1);
    let c = CommId(1);
    let setup: Vec<Event> = vec![attach(1), track(2, 3, 0, Ok(a))]
        .into_iter()
        .chain(pass(4, 5, &[a]))
        .collect();
    let untrack = |held: bool, last: bool| {
        vec![
            ev(
                21,
                22,
                Obs::Untrack {
                    addr: 0,
                    result: Ok(segment_registry_proptests::model::UntrackOut {
                        segment: a,
                        windows: vec![(c, 1)],
                        held,
                    }),
                },
            ),
            ev(
                23,
                24,
                Obs::Release {
                    seg: a,
                    result: last,
                },
            ),
        ]
    };
    let forget = |free_now: Vec<Segment>| {
        vec![
            ev(
                20,
                30,
                Obs::ForgetBegin {
                    comm: c,
                    result: Ok(()),
                    free_now,
                },
            ),
            ev(
                20,
                30,
                Obs::ForgetFlag {
                    comm: c,
                    pass_running: false,
                },
            ),
            ev(20, 30, Obs::ForgetEnd { comm: c }),
        ]
    };
    let h = |threads: Vec<Vec<Event>>| History {
        threads: std::iter::once(setup.clone()).chain(threads).collect(),
    };
    // The untrack's caller released first; the forget's release was last.
    check(
        &initial_model(),
        &h(vec![forget(vec![a]), untrack(true, false)]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // The forget released first; the untrack's caller frees.
    check(
        &initial_model(),
        &h(vec![forget(vec![]), untrack(true, true)]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Nobody is told to free A.
    check(
        &initial_model(),
        &h(vec![forget(vec![]), untrack(true, false)]),
    )
    .expect_err("A's memory is never freed");
    // No forget: nobody held A.
    check(&initial_model(), &h(vec![untrack(true, true)])).expect_err("no holder");
    check(&initial_model(), &h(vec![untrack(false, true)])).expect_err("no hold to release");
}
