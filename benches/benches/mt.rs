//! Multi-thread throughput and pass latency (a `harness = false` binary).
//!
//! * Throughput: T worker threads on one map of n live segments for a fixed
//!   time; each op is a containing-address lookup (75 % in `read-mostly`,
//!   50 % in `churn-heavy`) or an untrack + track of a random live segment
//!   owned by that thread (segments are dealt to threads round-robin, so n
//!   stays constant and no two threads race on one segment). Reports ops/s.
//! * Pass latency: a registration pass with nothing pending, idle and while
//!   15 threads do lookups (median over batches).
//!
//! Flags (unknown ones, such as criterion's, are ignored):
//! `--bench` (given by `cargo bench`; without it, or with `--test`, this is
//! a smoke run of a few milliseconds per point), `--secs S` (per throughput
//! point; env `SEGREG_MT_SECS`, default 1), `--threads 1,2,4,8,16` (env
//! `SEGREG_MT_THREADS`), `--sizes 1000,100000` (env `SEGREG_MT_SIZES`),
//! `--impls registry,raw-skipmap` (env `SEGREG_MT_IMPLS`; default all).
//! Writes `mt.json` and `mt.csv` to the results folder (see
//! `segment_registry_benches::results`; a smoke run writes to `smoke/`
//! inside it).

#[cfg(not(feature = "loom"))]
mod mt {
    use std::hint::black_box;
    use std::io::Write as _;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Barrier;
    use std::time::{Duration, Instant};

    use segment_registry_benches::maps::{visit_all, ImplVisitor, SegmentMap};
    use segment_registry_benches::results::{self, MtResults, PassLatency, Throughput};
    use segment_registry_benches::workload::{layout, machine, probes, Rng};

    /// Threads doing lookups during the loaded pass-latency measurement.
    const LOOKUP_THREADS: usize = 15;
    const SEED: u64 = 0x6d74_2e72;

    /// The run's settings.
    pub(crate) struct Config {
        pub(crate) smoke: bool,
        pub(crate) secs: f64,
        pub(crate) threads: Vec<usize>,
        pub(crate) sizes: Vec<usize>,
        /// Implementations to run (all if empty).
        pub(crate) impls: Vec<String>,
    }

    fn list(s: &str) -> Option<Vec<usize>> {
        s.split(',').map(|x| x.trim().parse().ok()).collect()
    }

    impl Config {
        pub(crate) fn from_env_and_args() -> Config {
            let args: Vec<String> = std::env::args().skip(1).collect();
            let flag = |name: &str| args.iter().any(|a| a == name);
            let value = |name: &str, env: &str| {
                args.iter()
                    .position(|a| a == name)
                    .and_then(|i| args.get(i + 1).cloned())
                    .or_else(|| std::env::var(env).ok())
            };
            let smoke = flag("--test") || !flag("--bench");
            let mut c = Config {
                smoke,
                secs: value("--secs", "SEGREG_MT_SECS")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(1.0),
                threads: value("--threads", "SEGREG_MT_THREADS")
                    .and_then(|s| list(&s))
                    .unwrap_or_else(|| vec![1, 2, 4, 8, 16]),
                sizes: value("--sizes", "SEGREG_MT_SIZES")
                    .and_then(|s| list(&s))
                    .unwrap_or_else(|| vec![1_000, 100_000]),
                impls: value("--impls", "SEGREG_MT_IMPLS")
                    .map(|s| s.split(',').map(|x| x.trim().to_string()).collect())
                    .unwrap_or_default(),
            };
            if smoke {
                c.secs = 0.01;
                c.threads = vec![1, 2];
                c.sizes = vec![1_000];
            }
            c
        }
    }

    /// The two mixes: name and percentage of lookups.
    const MIXES: [(&str, usize); 2] = [("read-mostly", 75), ("churn-heavy", 50)];

    /// Runs `threads` workers on `m` for `secs`; returns (ops, seconds).
    fn throughput<M: SegmentMap>(
        m: &M,
        slots: &[(usize, usize)],
        threads: usize,
        lookup_pct: usize,
        secs: f64,
    ) -> (u64, f64) {
        let stop = AtomicBool::new(false);
        let start = Barrier::new(threads + 1);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let (stop, start) = (&stop, &start);
                    s.spawn(move || {
                        let owned: Vec<(usize, usize)> =
                            slots.iter().copied().skip(t).step_by(threads).collect();
                        let probes = probes(slots, 4096, SEED ^ (t as u64 + 1));
                        let mut rng = Rng::new(SEED.wrapping_mul(t as u64 + 7));
                        let mut ops = 0u64;
                        let mut p = 0usize;
                        start.wait();
                        // Relaxed: a stop request; nothing is published by it.
                        while !stop.load(Ordering::Relaxed) {
                            if rng.below(100) < lookup_pct || owned.is_empty() {
                                black_box(m.lookup(probes[p & 4095]));
                                p = p.wrapping_add(1);
                            } else {
                                let (a, l) = owned[rng.below(owned.len())];
                                let ok = m.untrack(a) & m.track(a, l);
                                assert!(ok, "{}: churn refused", M::NAME);
                            }
                            ops += 1;
                        }
                        ops
                    })
                })
                .collect();
            start.wait();
            let t0 = Instant::now();
            std::thread::sleep(Duration::from_secs_f64(secs));
            // Relaxed: see the workers' load.
            stop.store(true, Ordering::Relaxed);
            let ops: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
            (ops, t0.elapsed().as_secs_f64())
        })
    }

    /// The median over batches of the mean ns of a nothing-pending pass, and
    /// the overall mean, with `lookup_threads` threads doing lookups
    /// meanwhile. Stops after 300 batches or `budget`, whichever comes first
    /// (at least 3 batches), after 10 untimed warm-up batches.
    fn pass_latency<M: SegmentMap>(
        m: &M,
        comm: u64,
        slots: &[(usize, usize)],
        lookup_threads: usize,
        budget: Duration,
    ) -> (f64, f64) {
        const BATCH: u32 = 100;
        let stop = AtomicBool::new(false);
        let start = Barrier::new(lookup_threads + 1);
        std::thread::scope(|s| {
            for t in 0..lookup_threads {
                let (stop, start) = (&stop, &start);
                s.spawn(move || {
                    let probes = probes(slots, 4096, SEED ^ (t as u64 + 100));
                    let mut p = 0usize;
                    start.wait();
                    // Relaxed: a stop request.
                    while !stop.load(Ordering::Relaxed) {
                        black_box(m.lookup(probes[p & 4095]));
                        p = p.wrapping_add(1);
                    }
                });
            }
            start.wait();
            for _ in 0..10 * BATCH {
                black_box(m.pass(black_box(comm)));
            }
            let mut per_pass = Vec::new();
            let t0 = Instant::now();
            while per_pass.len() < 300 && (per_pass.len() < 3 || t0.elapsed() < budget) {
                let t = Instant::now();
                for _ in 0..BATCH {
                    let done = m.pass(black_box(comm));
                    debug_assert_eq!(done, Some(0));
                }
                per_pass.push(t.elapsed().as_nanos() as f64 / f64::from(BATCH));
            }
            // Relaxed: a stop request.
            stop.store(true, Ordering::Relaxed);
            let mean = per_pass.iter().sum::<f64>() / per_pass.len() as f64;
            per_pass.sort_by(f64::total_cmp);
            (per_pass[per_pass.len() / 2], mean)
        })
    }

    struct Run<'a> {
        cfg: &'a Config,
        n: usize,
        out: &'a mut MtResults,
    }

    impl ImplVisitor for Run<'_> {
        fn visit<M: SegmentMap>(&mut self) {
            let (cfg, n) = (self.cfg, self.n);
            if !cfg.impls.is_empty() && !cfg.impls.iter().any(|i| i == M::NAME) {
                return;
            }
            let slots = layout(n, SEED ^ n as u64);
            let m = M::new();
            // Track in a random order, as the single-thread benches do (seq
            // order then differs from address order).
            let mut order: Vec<usize> = (0..n).collect();
            Rng::new(SEED ^ 0x5eed).shuffle(&mut order);
            for &i in &order {
                let (a, l) = slots[i];
                assert!(m.track(a, l), "{}: initial track refused", M::NAME);
            }
            for (mix, pct) in MIXES {
                for &threads in &cfg.threads {
                    let (ops, secs) = throughput(&m, &slots, threads, pct, cfg.secs);
                    let row = Throughput {
                        implementation: M::NAME.into(),
                        n,
                        mix: mix.into(),
                        threads,
                        secs,
                        ops,
                        ops_per_sec: ops as f64 / secs,
                    };
                    eprintln!(
                        "mt  n={n:<6} {mix:<11} T={threads:<2} {:<14} {:>10.3} Mops/s",
                        M::NAME,
                        row.ops_per_sec / 1e6
                    );
                    self.out.throughput.push(row);
                }
            }
            if let Some(comm) = m.attach() {
                let _ = m.pass(comm);
                let budget = Duration::from_secs_f64(cfg.secs.max(0.01) * 2.0);
                // Right after the churn above: epoch-based maps still hold
                // its deferred frees, which whoever pins next runs.
                let (after_churn_ns, _) = pass_latency(&m, comm, &slots, 0, budget);
                m.settle();
                let (idle_ns, idle_mean_ns) = pass_latency(&m, comm, &slots, 0, budget);
                let (loaded_ns, loaded_mean_ns) =
                    pass_latency(&m, comm, &slots, LOOKUP_THREADS, budget);
                eprintln!(
                    "pass n={n:<6} {:<14} after churn {after_churn_ns:>7.1} ns, \
                     idle {idle_ns:>7.1} ns (mean {idle_mean_ns:.1}), \
                     with {LOOKUP_THREADS} lookup threads {loaded_ns:>9.1} ns (mean {loaded_mean_ns:.1})",
                    M::NAME
                );
                self.out.pass_latency.push(PassLatency {
                    implementation: M::NAME.into(),
                    n,
                    idle_ns,
                    loaded_ns,
                    idle_mean_ns,
                    loaded_mean_ns,
                    after_churn_ns,
                    lookup_threads: LOOKUP_THREADS,
                });
            }
        }
    }

    /// Runs everything and writes the files.
    pub(crate) fn main() {
        let cfg = Config::from_env_and_args();
        let mut out = MtResults {
            machine: machine::describe(),
            secs_per_point: cfg.secs,
            smoke: cfg.smoke,
            ..MtResults::default()
        };
        for &n in &cfg.sizes {
            visit_all(&mut Run {
                cfg: &cfg,
                n,
                out: &mut out,
            });
        }
        let mut dir = results::results_dir();
        if cfg.smoke {
            dir.push("smoke");
        }
        std::fs::create_dir_all(&dir).expect("create the results folder");
        let json = dir.join(results::MT_JSON);
        std::fs::write(&json, serde_json::to_string_pretty(&out).unwrap()).expect("write mt.json");
        let mut csv = std::fs::File::create(dir.join(results::MT_CSV)).expect("create mt.csv");
        writeln!(csv, "implementation,n,mix,threads,secs,ops,ops_per_sec").unwrap();
        for r in &out.throughput {
            writeln!(
                csv,
                "{},{},{},{},{:.4},{},{:.1}",
                r.implementation, r.n, r.mix, r.threads, r.secs, r.ops, r.ops_per_sec
            )
            .unwrap();
        }
        eprintln!("mt: wrote {}", json.display());
    }
}

#[cfg(not(feature = "loom"))]
fn main() {
    mt::main();
}

#[cfg(feature = "loom")]
fn main() {}
