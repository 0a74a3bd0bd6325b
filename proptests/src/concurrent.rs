//! Running operations on a shared registry from several threads and
//! recording what each observed, as [`Event`]s for the checker.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use segment_registry::{AddressIndex, CommId, Faults, HandBack, PassError, Registry, Segment};

use crate::lin::{mark_excuses, Clock, Event, History, Obs};
use crate::model::{CbResult, Model, Payload, UntrackOut, Window};
use crate::ops::{PassEnd, GRANULE};

/// A thread's operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TOp {
    /// `track(addr, len)`.
    Track {
        /// Start.
        addr: usize,
        /// Length.
        len: usize,
    },
    /// `untrack(addr)`, then release of its hold if it has one.
    Untrack {
        /// Start.
        addr: usize,
    },
    /// `find(addr)`.
    Find {
        /// Any address.
        addr: usize,
    },
    /// `pending(comm)`.
    Pending {
        /// The comm.
        comm: CommId,
    },
    /// `forget(comm)`, then release of its windows' holds.
    Forget {
        /// The comm.
        comm: CommId,
    },
    /// A pass; its callback fails at the `fail_at`-th call, returns
    /// `Ok(None)` where bit `k` of `no_window` is set, and, if `park`,
    /// waits in its first call until every other thread has run its
    /// operations.
    Pass {
        /// The comm.
        comm: CommId,
        /// Where the callback fails.
        fail_at: Option<usize>,
        /// Which calls register without a window.
        no_window: u8,
        /// Park in the first call.
        park: bool,
    },
}

/// The shared books: every window handed back exactly once, every free
/// told exactly once, across all threads.
#[derive(Debug, Default)]
pub struct SharedLedger {
    inner: Mutex<(BTreeSet<Window>, BTreeSet<Window>, BTreeSet<u64>)>,
    next_window: AtomicU64,
}

impl SharedLedger {
    fn issue(&self) -> Window {
        let w = self.next_window.fetch_add(1, Ordering::Relaxed) + 1;
        self.inner.lock().unwrap().0.insert(w);
        w
    }

    fn give_back(&self, w: Window) {
        let mut l = self.inner.lock().unwrap();
        assert!(l.0.contains(&w), "window {w} handed back, never issued");
        assert!(l.1.insert(w), "window {w} handed back twice");
    }

    fn free(&self, s: &Segment) {
        let mut l = self.inner.lock().unwrap();
        assert!(l.2.insert(s.seq), "told to free {s:?} twice");
    }

    /// Whether every issued window came back and exactly the segments in
    /// `untracked` were freed.
    pub fn settled(&self, untracked: &BTreeSet<u64>) -> Result<(), String> {
        let l = self.inner.lock().unwrap();
        let lost: Vec<_> = l.0.difference(&l.1).collect();
        if !lost.is_empty() {
            return Err(format!("windows never handed back: {lost:?}"));
        }
        if l.2 != *untracked {
            return Err(format!(
                "frees told {:?} vs segments untracked {untracked:?}",
                l.2
            ));
        }
        Ok(())
    }
}

/// Parks a pass callback until the other threads are done.
#[derive(Debug, Default)]
pub struct Park {
    state: Mutex<(bool, usize)>,
    cv: Condvar,
}

const PARK_TIMEOUT: Duration = Duration::from_secs(10);

impl Park {
    fn parked(&self) {
        self.state.lock().unwrap().0 = true;
        self.cv.notify_all();
    }

    fn wait_parked(&self) {
        let g = self.state.lock().unwrap();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, PARK_TIMEOUT, |s| !s.0)
            .unwrap();
        assert!(g.0, "the parked pass never parked");
    }

    fn done(&self) {
        self.state.lock().unwrap().1 += 1;
        self.cv.notify_all();
    }

    fn wait_done(&self, n: usize) {
        let g = self.state.lock().unwrap();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, PARK_TIMEOUT, |s| s.1 < n)
            .unwrap();
        assert!(g.1 >= n, "the other threads never finished");
    }
}

/// Records one thread's events.
pub struct Recorder<'a, I: AddressIndex> {
    reg: &'a Registry<Payload, Window, I>,
    clock: &'a Clock,
    ledger: &'a SharedLedger,
    /// The events so far.
    pub events: Vec<Event>,
    /// Seqs of the segments this thread untracked.
    pub untracked: BTreeSet<u64>,
}

impl<'a, I: AddressIndex> Recorder<'a, I> {
    /// A recorder for one thread.
    pub fn new(
        reg: &'a Registry<Payload, Window, I>,
        clock: &'a Clock,
        ledger: &'a SharedLedger,
    ) -> Self {
        Recorder {
            reg,
            clock,
            ledger,
            events: Vec::new(),
            untracked: BTreeSet::new(),
        }
    }

    /// Records an event.
    pub fn push(&mut self, call: u64, ret: u64, obs: Obs) {
        self.events.push(Event { call, ret, obs });
    }

    fn release_all(&mut self, hbs: Vec<HandBack<'a, Window>>) {
        for hb in hbs {
            self.ledger.give_back(hb.window);
            let t0 = self.clock.now();
            let last = hb.hold.release();
            let t1 = self.clock.now();
            if last {
                self.ledger.free(&hb.segment);
            }
            self.push(
                t0,
                t1,
                Obs::Release {
                    seg: hb.segment,
                    result: last,
                },
            );
        }
    }

    /// Runs `op`, recording its events. `park` is the parking place of a
    /// parked pass, and the number of threads it waits for.
    pub fn run(&mut self, op: &TOp, park: Option<(&Park, usize)>) {
        self.run_jittered(op, park, None);
    }

    /// [`Recorder::run`], with callbacks that busy-wait a random while.
    pub fn run_jittered(
        &mut self,
        op: &TOp,
        park: Option<(&Park, usize)>,
        mut rng: Option<&mut Rng>,
    ) {
        let c = self.clock;
        match *op {
            TOp::Track { addr, len } => {
                let t0 = c.now();
                let result = self.reg.track(addr, len);
                let t1 = c.now();
                self.push(
                    t0,
                    t1,
                    Obs::Track {
                        addr,
                        len,
                        result,
                        excused: false,
                    },
                );
            }
            TOp::Untrack { addr } => {
                let t0 = c.now();
                let r = self.reg.untrack(addr);
                let t1 = c.now();
                match r {
                    Err(e) => self.push(
                        t0,
                        t1,
                        Obs::Untrack {
                            addr,
                            result: Err(e),
                        },
                    ),
                    Ok(mut u) => {
                        self.untracked.insert(u.segment.seq);
                        let mut windows = u.windows.clone();
                        windows.sort();
                        for (_, w) in &windows {
                            self.ledger.give_back(*w);
                        }
                        let out = UntrackOut {
                            segment: u.segment,
                            windows,
                            held: u.pass_hold.is_some(),
                        };
                        self.push(
                            t0,
                            t1,
                            Obs::Untrack {
                                addr,
                                result: Ok(out),
                            },
                        );
                        match u.pass_hold.take() {
                            None => self.ledger.free(&u.segment),
                            Some(h) => {
                                let t2 = c.now();
                                let last = h.release();
                                let t3 = c.now();
                                if last {
                                    self.ledger.free(&u.segment);
                                }
                                self.push(
                                    t2,
                                    t3,
                                    Obs::Release {
                                        seg: u.segment,
                                        result: last,
                                    },
                                );
                            }
                        }
                    }
                }
            }
            TOp::Find { addr } => {
                let t0 = c.now();
                let result = self.reg.find(addr);
                let t1 = c.now();
                self.push(t0, t1, Obs::Find { addr, result });
            }
            TOp::Pending { comm } => {
                let t0 = c.now();
                let result = self.reg.pending(comm);
                let t1 = c.now();
                self.push(t0, t1, Obs::Pending { comm, result });
            }
            TOp::Forget { comm } => {
                let t0 = c.now();
                let r = self.reg.forget(comm);
                let t1 = c.now();
                match r {
                    Err(e) => self.push(
                        t0,
                        t1,
                        Obs::ForgetBegin {
                            comm,
                            result: Err(e),
                            free_now: Vec::new(),
                        },
                    ),
                    Ok(f) => {
                        for s in &f.free_now {
                            self.ledger.free(s);
                        }
                        self.push(
                            t0,
                            t1,
                            Obs::ForgetBegin {
                                comm,
                                result: Ok(()),
                                free_now: f.free_now.clone(),
                            },
                        );
                        self.push(
                            t0,
                            t1,
                            Obs::ForgetFlag {
                                comm,
                                pass_running: f.pass_running,
                            },
                        );
                        for hb in &f.windows {
                            assert_eq!(hb.comm, comm);
                            self.push(
                                t0,
                                t1,
                                Obs::ForgetTake {
                                    comm,
                                    seg: hb.segment,
                                    window: hb.window,
                                },
                            );
                        }
                        self.push(t0, t1, Obs::ForgetEnd { comm });
                        self.release_all(f.windows);
                    }
                }
            }
            TOp::Pass {
                comm,
                fail_at,
                no_window,
                park: parks,
            } => {
                let mut calls: Vec<(u64, Segment, CbResult, u64)> = Vec::new();
                let ledger = self.ledger;
                let t_call = c.now();
                let r = self.reg.register_pending(comm, |_, seg| {
                    let t_in = c.now();
                    if let Some(rng) = rng.as_deref_mut() {
                        jitter(rng);
                    }
                    let k = calls.len();
                    if let (true, 0, Some((p, n))) = (parks, k, park) {
                        p.parked();
                        p.wait_done(n);
                    }
                    let cb = if fail_at == Some(k) {
                        CbResult::Fail(k as u32)
                    } else if k < 8 && no_window & (1 << k) != 0 {
                        CbResult::NoWindow
                    } else {
                        CbResult::Window(ledger.issue())
                    };
                    calls.push((t_in, *seg, cb, c.now()));
                    match cb {
                        CbResult::Fail(e) => Err(e),
                        CbResult::Window(w) => Ok(Some(w)),
                        _ => Ok(None),
                    }
                });
                let t_ret = c.now();
                if let Some((p, _)) = park {
                    if parks {
                        p.parked();
                    }
                }
                let (report, end) = match r {
                    Ok(rep) => (rep, PassEnd::Ok),
                    Err(f) => {
                        let end = match f.error {
                            PassError::Comm(e) => {
                                self.push(
                                    t_call,
                                    t_ret,
                                    Obs::PassClaim {
                                        comm,
                                        result: Err(e),
                                    },
                                );
                                return;
                            }
                            PassError::Callback { segment, error } => {
                                PassEnd::Callback(segment, error)
                            }
                            PassError::Forgotten(c) => PassEnd::Forgotten(c),
                            // These histories run unchecked passes only.
                            PassError::Diverged(_) | PassError::Agreement { .. } => {
                                unreachable!("an unchecked pass never diverges")
                            }
                        };
                        (f.report, end)
                    }
                };
                let first = calls.first().map_or(t_ret, |x| x.0);
                self.push(
                    t_call,
                    first,
                    Obs::PassClaim {
                        comm,
                        result: Ok(()),
                    },
                );
                self.push(t_call, first, Obs::PassFixEnd { comm });
                let handed: Vec<(Segment, CommId, Window)> = report
                    .handed_back
                    .iter()
                    .map(|h| (h.segment, h.comm, h.window))
                    .collect();
                let mut lo = t_call;
                for (k, &(t_in, seg, cb, t_out)) in calls.iter().enumerate() {
                    self.push(
                        lo,
                        t_in,
                        Obs::PassCheck {
                            comm,
                            next: Some(seg),
                        },
                    );
                    let hi = calls.get(k + 1).map_or(t_ret, |x| x.0);
                    let handed_back = handed.iter().any(|h| h.0.seq == seg.seq);
                    self.push(
                        t_out,
                        hi,
                        Obs::PassAdd {
                            comm,
                            cb,
                            handed_back,
                        },
                    );
                    if !matches!(cb, CbResult::Fail(_)) {
                        self.push(t_out, hi, Obs::PassRelease { comm });
                    }
                    lo = t_out;
                }
                if !matches!(end, PassEnd::Callback(..)) {
                    self.push(lo, t_ret, Obs::PassCheck { comm, next: None });
                }
                self.push(lo, t_ret, Obs::PassFinishCursor { comm });
                for s in &report.free_now {
                    self.ledger.free(s);
                }
                self.push(
                    lo,
                    t_ret,
                    Obs::PassUnbusy {
                        comm,
                        end,
                        registered: report.registered.clone(),
                        handed_back: handed,
                        free_now: report.free_now.clone(),
                    },
                );
                self.release_all(report.handed_back);
            }
        }
    }
}

/// A small deterministic generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `true` with probability `1/n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// Address slots of concurrent histories: few, so that threads collide.
pub const LIN_SLOTS: usize = 6;

/// Comms attached by the setup of every history.
pub const LIN_COMMS: [CommId; 2] = [CommId(1), CommId(2)];

/// A random operation for a concurrent thread.
pub fn random_op(rng: &mut Rng) -> TOp {
    let addr = rng.below(LIN_SLOTS) * GRANULE;
    let comm = if rng.one_in(8) {
        CommId(3) // never attached
    } else {
        LIN_COMMS[rng.below(2)]
    };
    match rng.below(12) {
        0..=2 => TOp::Track {
            addr,
            len: (1 + rng.below(2)) * GRANULE,
        },
        3..=5 => TOp::Untrack { addr },
        6 => TOp::Find {
            addr: addr + rng.below(2) * (GRANULE / 2),
        },
        7 => TOp::Forget { comm },
        _ => TOp::Pass {
            comm,
            fail_at: rng.one_in(4).then(|| rng.below(3)),
            no_window: if rng.one_in(4) { 1 << rng.below(3) } else { 0 },
            park: false,
        },
    }
}

/// The plan of one history: a setup run alone, then threads released
/// together from a barrier.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Operations run by the main thread before the others start.
    pub setup: Vec<TOp>,
    /// Each thread's operations.
    pub threads: Vec<Vec<TOp>>,
    /// Thread 0's first operation is a pass that parks in its first
    /// callback until the others are done.
    pub parked: bool,
    /// Seeds the random busy-waits before each operation and inside each
    /// callback (they vary how the threads' operations overlap).
    pub jitter: u64,
}

/// A random plan: `threads` threads of 2 to 4 operations (3 with a parked
/// pass).
pub fn random_plan(rng: &mut Rng, threads: usize, parked: bool) -> Plan {
    let mut setup = Vec::new();
    for _ in 0..3 + rng.below(3) {
        setup.push(TOp::Track {
            addr: rng.below(LIN_SLOTS) * GRANULE,
            len: GRANULE,
        });
    }
    // Comm 1 has registered the setup segments; comm 2 has all pending.
    setup.push(TOp::Pass {
        comm: LIN_COMMS[0],
        fail_at: None,
        no_window: 0,
        park: false,
    });
    let mut ts: Vec<Vec<TOp>> = (0..threads)
        .map(|_| (0..2 + rng.below(3)).map(|_| random_op(rng)).collect())
        .collect();
    if parked {
        if rng.one_in(3) {
            setup.push(TOp::Track {
                addr: LIN_SLOTS * GRANULE,
                len: GRANULE,
            });
        }
        ts[0] = vec![TOp::Pass {
            comm: LIN_COMMS[rng.below(2)],
            fail_at: rng.one_in(4).then(|| 1 + rng.below(2)),
            no_window: 0,
            park: true,
        }];
        ts[0].extend((0..rng.below(2)).map(|_| random_op(rng)));
    }
    Plan {
        setup,
        threads: ts,
        parked,
        jitter: rng.next_u64(),
    }
}

/// Busy-waits for a random short while (0 to a few microseconds), or
/// yields the processor.
fn jitter(rng: &mut Rng) {
    match rng.below(8) {
        0 => std::thread::yield_now(),
        1 => {
            for _ in 0..rng.below(20_000) {
                std::hint::spin_loop();
            }
        }
        _ => {
            for _ in 0..rng.below(1_000) {
                std::hint::spin_loop();
            }
        }
    }
}

/// A recorded history, and the verdict of the shared ledger on it.
#[derive(Debug)]
pub struct Recorded {
    /// The history: setup on the first thread, the plan's threads, then a
    /// last thread that checks the state at rest, drains and forgets all.
    pub history: History,
    /// Whether every window and free was accounted for exactly once.
    pub ledger: Result<(), String>,
}

/// Runs `plan` on `reg` (a fresh registry) and records it.
pub fn run_plan<I: AddressIndex>(reg: &Registry<Payload, Window, I>, plan: &Plan) -> Recorded {
    let clock = Clock::default();
    let ledger = SharedLedger::default();
    let mut main = Recorder::new(reg, &clock, &ledger);
    for _ in &LIN_COMMS {
        let t0 = clock.now();
        let result = reg.attach(0);
        let t1 = clock.now();
        main.push(t0, t1, Obs::Attach { payload: 0, result });
    }
    for op in &plan.setup {
        main.run(op, None);
    }
    // A spinning barrier: the threads start within a few hundred
    // nanoseconds of each other (a sleeping one wakes them much further
    // apart).
    let ready = AtomicUsize::new(0);
    let go = AtomicBool::new(false);
    let park = Park::default();
    let others = plan.threads.len() - 1;
    let results: Vec<(Vec<Event>, BTreeSet<u64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = plan
            .threads
            .iter()
            .enumerate()
            .map(|(t, ops)| {
                let (clock, ledger, park, ready, go) = (&clock, &ledger, &park, &ready, &go);
                let mut rng = Rng::new(plan.jitter.wrapping_add(t as u64));
                s.spawn(move || {
                    let mut r = Recorder::new(reg, clock, ledger);
                    // Relaxed/Acquire: only a start signal; the registry's
                    // own synchronization is what is under test.
                    ready.fetch_add(1, Ordering::Relaxed);
                    while !go.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                        std::thread::yield_now();
                    }
                    if plan.parked && t > 0 {
                        park.wait_parked();
                    }
                    for (i, op) in ops.iter().enumerate() {
                        let parking = (plan.parked && t == 0 && i == 0).then_some((park, others));
                        jitter(&mut rng);
                        r.run_jittered(op, parking, Some(&mut rng));
                    }
                    if plan.parked && t > 0 {
                        park.done();
                    }
                    (r.events, r.untracked)
                })
            })
            .collect();
        while ready.load(Ordering::Relaxed) < plan.threads.len() {
            std::thread::yield_now();
        }
        // Release: pairs with the threads' Acquire.
        go.store(true, Ordering::Release);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut untracked = main.untracked.clone();
    let mut h = History {
        threads: vec![std::mem::take(&mut main.events)],
    };
    for (evs, u) in results {
        untracked.extend(u);
        h.threads.push(evs);
    }
    // After every thread: the state at rest, then drain and forget all, so
    // that every window and free is accounted for.
    let mut fin = Recorder::new(reg, &clock, &ledger);
    let t0 = clock.now();
    let stats = reg.stats();
    let obs = Obs::Final {
        by_seq: reg.segments_by_seq(),
        pending: LIN_COMMS.iter().map(|&c| (c, reg.pending(c))).collect(),
        windows: stats.comms.iter().map(|c| (c.comm, c.windows)).collect(),
    };
    let t1 = clock.now();
    fin.push(t0, t1, obs);
    for s in reg.segments_by_seq() {
        fin.run(&TOp::Untrack { addr: s.addr }, None);
    }
    for c in reg.comms() {
        fin.run(&TOp::Forget { comm: c }, None);
    }
    untracked.extend(fin.untracked.iter().copied());
    h.threads.push(fin.events);
    mark_excuses(&mut h);
    Recorded {
        history: h,
        ledger: ledger.settled(&untracked),
    }
}

/// The model a history from [`run_plan`] starts from.
pub fn initial_model() -> Model {
    Model::new(false)
}

/// Builds a registry with `faults` and runs `plan` on it.
pub fn run_plan_fresh(faults: Faults, plan: &Plan) -> Recorded {
    let reg: Registry<Payload, Window> = Registry::with_faults(faults);
    run_plan(&reg, plan)
}
