//! Single-thread criterion benchmarks: every implementation side by side,
//! with n = 25, 1,000 and 100,000 live segments.
//!
//! Groups (criterion ids `GROUP/IMPL/N`): `track`, `untrack`, `round_trip`
//! (untrack + track of one random live segment), `lookup` (containing
//! address), `by_address`, `by_seq`, `pass_none` (nothing pending),
//! `pass_k25` and `pass_k1000` (k pending), `window_of` (issue 9: the
//! window and offset of a random range inside a random live segment, every
//! segment registered with one comm; only where the implementation keeps
//! windows). n stays constant: the track and untrack benches move a batch of
//! B segments between a live and a spare set (live count within [n - B,
//! n + B], B = 8, 64, 256), timing only the measured operation; see
//! `benches/README.md`.
//!
//! Run: `cargo bench -p segment-registry-benches --bench st -- --warm-up-time 1
//! --measurement-time 2`; `-- --test` runs each benchmark once.

#[cfg(not(feature = "loom"))]
mod st {
    use std::hint::black_box;
    use std::time::{Duration, Instant};

    use criterion::measurement::WallTime;
    use criterion::{BatchSize, BenchmarkGroup, BenchmarkId, Criterion};
    use segment_registry_benches::maps::{has_window_of, visit_all, ImplVisitor, SegmentMap};
    use segment_registry_benches::workload::{probes, range_probes, Population};

    /// Live-segment counts.
    pub(crate) const SIZES: [usize; 3] = [25, 1_000, 100_000];
    /// Pending counts for the pass benches (k <= n).
    const PENDING: [usize; 2] = [25, 1_000];
    const SEED: u64 = 0x5e6_2e61;

    /// The batch moved between the live and spare sets per timed chunk.
    fn batch(n: usize) -> usize {
        match n {
            0..=99 => 8,
            100..=9_999 => 64,
            _ => 256,
        }
    }

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub(crate) enum Op {
        Track,
        Untrack,
        RoundTrip,
        Lookup,
        ByAddress,
        BySeq,
        PassNone,
        PassK(usize),
        WindowOf,
    }

    impl Op {
        pub(crate) fn all() -> Vec<Op> {
            let mut v = vec![
                Op::Track,
                Op::Untrack,
                Op::RoundTrip,
                Op::Lookup,
                Op::ByAddress,
                Op::BySeq,
                Op::PassNone,
            ];
            v.extend(PENDING.iter().map(|&k| Op::PassK(k)));
            v.push(Op::WindowOf);
            v
        }

        pub(crate) fn group(self) -> String {
            match self {
                Op::Track => "track".into(),
                Op::Untrack => "untrack".into(),
                Op::RoundTrip => "round_trip".into(),
                Op::Lookup => "lookup".into(),
                Op::ByAddress => "by_address".into(),
                Op::BySeq => "by_seq".into(),
                Op::PassNone => "pass_none".into(),
                Op::PassK(k) => format!("pass_k{k}"),
                Op::WindowOf => "window_of".into(),
            }
        }
    }

    /// Warm-up and measurement times as given on the command line (criterion's
    /// defaults otherwise), to scale the groups whose untimed setup dwarfs
    /// the timed part.
    #[derive(Clone, Copy)]
    pub(crate) struct Times {
        warm_up: Duration,
        measurement: Duration,
    }

    impl Times {
        pub(crate) fn from_args() -> Self {
            let args: Vec<String> = std::env::args().collect();
            let get = |name: &str, default: f64| {
                args.iter()
                    .position(|a| a == name)
                    .and_then(|i| args.get(i + 1))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(default)
            };
            Times {
                warm_up: Duration::from_secs_f64(get("--warm-up-time", 3.0)),
                measurement: Duration::from_secs_f64(get("--measurement-time", 5.0)),
            }
        }
    }

    struct Bench<'a, 'c> {
        group: &'a mut BenchmarkGroup<'c, WallTime>,
        op: Op,
        n: usize,
    }

    impl ImplVisitor for Bench<'_, '_> {
        fn visit<M: SegmentMap>(&mut self) {
            bench_one::<M>(self.group, self.op, self.n);
        }
    }

    /// Whether `M` has what `op` needs (no passes or seq order for the raw
    /// skiplist, no windows but in the registry and the `BTreeMap`: those
    /// rows are "n/a").
    fn supported<M: SegmentMap>(op: Op) -> bool {
        let probe = M::new();
        match op {
            Op::BySeq => probe.by_seq().is_some(),
            Op::PassNone | Op::PassK(_) => probe.attach().is_some(),
            Op::WindowOf => has_window_of::<M>(),
            _ => true,
        }
    }

    fn bench_one<M: SegmentMap>(g: &mut BenchmarkGroup<'_, WallTime>, op: Op, n: usize) {
        if !supported::<M>(op) {
            return;
        }
        let id = BenchmarkId::new(M::NAME, n);
        let b_size = batch(n);
        let m = M::new();
        let mut pop = Population::populate(&m, n, b_size, SEED ^ n as u64);
        match op {
            Op::Track => {
                g.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        let mut done = 0;
                        while done < iters {
                            let k = b_size.min((iters - done) as usize);
                            let batch = pop.pick_spare(k);
                            let mut ok = true;
                            let t = Instant::now();
                            for &(a, l) in &batch {
                                ok &= m.track(black_box(a), l);
                            }
                            total += t.elapsed();
                            assert!(ok, "{}: track refused", M::NAME);
                            pop.untrack_random(&m, k);
                            done += k as u64;
                        }
                        total
                    })
                });
            }
            Op::Untrack => {
                g.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        let mut done = 0;
                        while done < iters {
                            let k = b_size.min((iters - done) as usize);
                            let batch = pop.pick_live(k);
                            let mut ok = true;
                            let t = Instant::now();
                            for &(a, _) in &batch {
                                ok &= m.untrack(black_box(a));
                            }
                            total += t.elapsed();
                            assert!(ok, "{}: untrack refused", M::NAME);
                            pop.track_random(&m, k);
                            done += k as u64;
                        }
                        total
                    })
                });
            }
            Op::RoundTrip => {
                let live = pop.live_segments();
                g.bench_function(id, |b| {
                    b.iter(|| {
                        let (a, l) = live[pop.rng.below(live.len())];
                        let ok = m.untrack(black_box(a)) & m.track(a, l);
                        assert!(ok, "{}: round trip refused", M::NAME);
                    })
                });
            }
            Op::Lookup => {
                let live = pop.live_segments();
                let probes = probes(&live, 4096, SEED);
                let mut i = 0usize;
                g.bench_function(id, |b| {
                    b.iter(|| {
                        let a = probes[i & 4095];
                        i = i.wrapping_add(1);
                        black_box(m.lookup(black_box(a)))
                    })
                });
                assert!(m.lookup(probes[0]).is_some(), "{}: lookup missed", M::NAME);
            }
            Op::ByAddress => {
                assert_eq!(m.by_address(), n);
                g.bench_function(id, |b| b.iter(|| m.by_address()));
            }
            Op::BySeq => {
                assert_eq!(m.by_seq(), Some(n));
                g.bench_function(id, |b| b.iter(|| m.by_seq()));
            }
            Op::PassNone => {
                let comm = m.attach().expect("supported");
                assert_eq!(m.pass(comm), Some(n));
                assert_eq!(m.pass(comm), Some(0));
                g.bench_function(id, |b| b.iter(|| m.pass(black_box(comm))));
            }
            Op::PassK(k) => {
                let comm = m.attach().expect("supported");
                assert_eq!(m.pass(comm), Some(n));
                pop.make_pending(&m, k);
                let first = m.pass(comm).unwrap_or(0);
                assert!(first >= k, "{}: pass saw {first} < {k}", M::NAME);
                g.bench_function(id, |b| {
                    b.iter_batched(
                        || pop.make_pending(&m, k),
                        |()| m.pass(comm),
                        BatchSize::PerIteration,
                    )
                });
            }
            Op::WindowOf => {
                let comm = m.attach().expect("supported");
                assert_eq!(m.pass(comm), Some(n));
                let live = pop.live_segments();
                let probes = range_probes(&live, 4096, SEED);
                assert!(
                    probes
                        .iter()
                        .all(|&(a, s)| m.window_of(comm, a, s).is_some()),
                    "{}: window lookup missed",
                    M::NAME
                );
                let mut i = 0usize;
                g.bench_function(id, |b| {
                    b.iter(|| {
                        let (a, s) = probes[i & 4095];
                        i = i.wrapping_add(1);
                        black_box(m.window_of(black_box(comm), black_box(a), black_box(s)))
                    })
                });
            }
        }
    }

    /// The registry's own share of a checked pass (issue 19): the agreement
    /// is a group of one, so what is timed is the registry's work around
    /// the rendezvous, beside an unchecked pass, at n = 1,000 live
    /// segments: nothing pending, and one segment pending.
    pub(crate) fn run_checked(c: &mut Criterion) {
        use segment_registry::{DigestRange, Registry};
        let reg: Registry<(), u64> = Registry::new();
        for i in 0..1_000 {
            reg.track(0x7f00_0000_0000 + i * (4 << 20), 2 << 20)
                .unwrap();
        }
        let comm = reg.attach(());
        let ok = |_: &(), s: &segment_registry::Segment| Ok::<_, ()>(Some(s.seq));
        let alone = |_: &(), d: &segment_registry::Digest| Ok::<_, ()>(DigestRange::of_one(*d));
        assert_eq!(
            reg.register_pending(comm, ok).unwrap().registered.len(),
            1_000
        );
        let mut g = c.benchmark_group("checked_pass");
        g.bench_function("unchecked/none", |b| {
            b.iter(|| reg.register_pending(black_box(comm), ok).unwrap())
        });
        g.bench_function("checked/none", |b| {
            b.iter(|| {
                reg.register_pending_checked(black_box(comm), alone, ok)
                    .unwrap()
            })
        });
        let spare = 0x7e00_0000_0000;
        let repend = || {
            if let Ok(u) = reg.untrack(spare) {
                drop(u);
            }
            reg.track(spare, 2 << 20).unwrap();
        };
        g.bench_function("unchecked/one", |b| {
            b.iter_batched(
                repend,
                |()| reg.register_pending(comm, ok).unwrap(),
                BatchSize::PerIteration,
            )
        });
        g.bench_function("checked/one", |b| {
            b.iter_batched(
                repend,
                |()| reg.register_pending_checked(comm, alone, ok).unwrap(),
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }

    /// Runs every group.
    pub(crate) fn run(c: &mut Criterion, times: Times) {
        for op in Op::all() {
            let mut group = c.benchmark_group(op.group());
            for n in SIZES {
                if let Op::PassK(k) = op {
                    if k > n {
                        continue;
                    }
                    // Each iteration re-tracks k segments untimed, which costs
                    // several times the pass itself: shorten the timed budget
                    // so the wall time stays close to the other groups'.
                    group.warm_up_time(times.warm_up.mul_f64(0.25));
                    group.measurement_time(times.measurement.mul_f64(0.25));
                    group.sample_size(20);
                } else if n >= 100_000 {
                    // The O(n) baselines take milliseconds per iteration.
                    group.sample_size(20);
                } else {
                    group.sample_size(50);
                }
                visit_all(&mut Bench {
                    group: &mut group,
                    op,
                    n,
                });
            }
            group.finish();
        }
    }
}

#[cfg(not(feature = "loom"))]
fn main() {
    let times = st::Times::from_args();
    let mut c = criterion::Criterion::default()
        .without_plots()
        .nresamples(20_000)
        .configure_from_args();
    st::run(&mut c, times);
    st::run_checked(&mut c);
    c.final_summary();
}

#[cfg(feature = "loom")]
fn main() {}
