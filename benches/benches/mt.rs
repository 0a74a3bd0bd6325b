//! Multi-thread throughput and pass latency (a `harness = false` binary).
//!
//! * Throughput: T worker threads on one map of n live segments for a fixed
//!   time; each op is a containing-address lookup (75 % in `read-mostly`,
//!   50 % in `churn-heavy`) or an untrack + track of a random live segment
//!   owned by that thread (segments are dealt to threads round-robin, so n
//!   stays constant and no two threads race on one segment). Reports ops/s.
//! * Pass latency: a registration pass with nothing pending, idle and while
//!   15 threads do lookups (median over batches).
//! * Window lookup (issue 9): T threads doing only `window_of` lookups of
//!   random ranges inside random live segments, on one map of n segments
//!   that one comm registered. Reports ns per lookup per thread (T × elapsed
//!   ÷ lookups) and lookups/s. Only implementations that keep windows.
//!
//! Flags (unknown ones, such as criterion's, are ignored):
//! `--bench` (given by `cargo bench`; without it, or with `--test`, this is
//! a smoke run of a few milliseconds per point), `--secs S` (per throughput
//! point; env `SEGREG_MT_SECS`, default 1), `--threads 1,2,4,8,16` (env
//! `SEGREG_MT_THREADS`), `--sizes 1000,100000` (env `SEGREG_MT_SIZES`),
//! `--impls registry,raw-skipmap` (env `SEGREG_MT_IMPLS`; default all),
//! `--window-sizes 25,1000,100000` (env `SEGREG_MT_WINDOW_SIZES`),
//! `--window-threads 1,16` (env `SEGREG_MT_WINDOW_THREADS`), `--only
//! throughput|window_of` (env `SEGREG_MT_ONLY`; default both parts:
//! `throughput` is the throughput and pass-latency runs, `window_of` the
//! window lookups).
//! Writes `mt.json` and `mt.csv` to the results folder (see
//! `segment_registry_benches::results`; a smoke run writes to `smoke/`
//! inside it). With `--only`, the results of the part not run are kept from
//! the `mt.json` already there, if any.

#[cfg(not(feature = "loom"))]
mod mt {
    use std::hint::black_box;
    use std::io::Write as _;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Barrier;
    use std::time::{Duration, Instant};

    use segment_registry_benches::maps::{has_window_of, visit_all, ImplVisitor, SegmentMap};
    use segment_registry_benches::results::{
        self, MtResults, PassLatency, Throughput, WindowLookup,
    };
    use segment_registry_benches::workload::{layout, machine, probes, range_probes, Rng};

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
        /// Live-segment counts of the window-lookup part.
        pub(crate) window_sizes: Vec<usize>,
        /// Thread counts of the window-lookup part.
        pub(crate) window_threads: Vec<usize>,
        /// Run the throughput and pass-latency part.
        pub(crate) run_throughput: bool,
        /// Run the window-lookup part.
        pub(crate) run_window: bool,
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
                window_sizes: value("--window-sizes", "SEGREG_MT_WINDOW_SIZES")
                    .and_then(|s| list(&s))
                    .unwrap_or_else(|| vec![25, 1_000, 100_000]),
                window_threads: value("--window-threads", "SEGREG_MT_WINDOW_THREADS")
                    .and_then(|s| list(&s))
                    .unwrap_or_else(|| vec![1, 16]),
                run_throughput: true,
                run_window: true,
            };
            if let Some(only) = value("--only", "SEGREG_MT_ONLY") {
                let parts: Vec<&str> = only.split(',').map(str::trim).collect();
                for p in &parts {
                    assert!(
                        matches!(*p, "throughput" | "window_of"),
                        "mt: unknown part {p:?} (throughput, window_of)"
                    );
                }
                c.run_throughput = parts.contains(&"throughput");
                c.run_window = parts.contains(&"window_of");
            }
            if smoke {
                c.secs = 0.01;
                c.threads = vec![1, 2];
                c.sizes = vec![1_000];
                c.window_sizes = vec![25, 1_000];
                c.window_threads = vec![1, 2];
            }
            c
        }
    }

    /// The two mixes: name and percentage of lookups.
    const MIXES: [(&str, usize); 2] = [("read-mostly", 75), ("churn-heavy", 50)];

    /// Runs `threads` copies of `worker` for `secs` and returns the sum of
    /// what they return, and the seconds they ran. Each worker gets its
    /// index, waits on the barrier once its set-up is done, and runs until
    /// the flag is set.
    fn timed<W>(threads: usize, secs: f64, worker: W) -> (u64, f64)
    where
        W: Fn(usize, &Barrier, &AtomicBool) -> u64 + Sync,
    {
        let stop = AtomicBool::new(false);
        let start = Barrier::new(threads + 1);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let (stop, start, worker) = (&stop, &start, &worker);
                    s.spawn(move || worker(t, start, stop))
                })
                .collect();
            start.wait();
            let t0 = Instant::now();
            std::thread::sleep(Duration::from_secs_f64(secs));
            // Relaxed: a stop request; nothing is published by it.
            stop.store(true, Ordering::Relaxed);
            let done: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
            (done, t0.elapsed().as_secs_f64())
        })
    }

    /// Runs `threads` workers on `m` for `secs`; returns (ops, seconds).
    fn throughput<M: SegmentMap>(
        m: &M,
        slots: &[(usize, usize)],
        threads: usize,
        lookup_pct: usize,
        secs: f64,
    ) -> (u64, f64) {
        timed(threads, secs, |t, start, stop| {
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

    /// Runs `threads` threads doing only `window_of(comm, ..)` lookups on
    /// `m` for `secs`; returns (lookups, seconds).
    fn window_lookups<M: SegmentMap>(
        m: &M,
        comm: u64,
        slots: &[(usize, usize)],
        threads: usize,
        secs: f64,
    ) -> (u64, f64) {
        /// Lookups between two looks at the stop flag.
        const CHUNK: usize = 64;
        timed(threads, secs, |t, start, stop| {
            let probes = range_probes(slots, 4096, SEED ^ (t as u64 + 200));
            let (mut lookups, mut misses) = (0u64, 0u64);
            let mut p = 0usize;
            start.wait();
            // Relaxed: a stop request; nothing is published by it.
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..CHUNK {
                    let (a, size) = probes[p & 4095];
                    p = p.wrapping_add(1);
                    let found = m.window_of(comm, black_box(a), black_box(size));
                    misses += u64::from(black_box(found).is_none());
                }
                lookups += CHUNK as u64;
            }
            assert_eq!(misses, 0, "{}: window lookups missed", M::NAME);
            lookups
        })
    }

    struct WindowRun<'a> {
        cfg: &'a Config,
        n: usize,
        out: &'a mut MtResults,
    }

    impl ImplVisitor for WindowRun<'_> {
        fn visit<M: SegmentMap>(&mut self) {
            let (cfg, n) = (self.cfg, self.n);
            if !cfg.impls.is_empty() && !cfg.impls.iter().any(|i| i == M::NAME) {
                return;
            }
            if !has_window_of::<M>() {
                return;
            }
            let slots = layout(n, SEED ^ n as u64);
            let m = M::new();
            let mut order: Vec<usize> = (0..n).collect();
            Rng::new(SEED ^ 0x5eed).shuffle(&mut order);
            for &i in &order {
                let (a, l) = slots[i];
                assert!(m.track(a, l), "{}: initial track refused", M::NAME);
            }
            let comm = m.attach().expect("has_window_of attached one");
            assert_eq!(m.pass(comm), Some(n), "{}: pass", M::NAME);
            m.settle();
            for &threads in &cfg.window_threads {
                let (lookups, secs) = window_lookups(&m, comm, &slots, threads, cfg.secs);
                let row = WindowLookup {
                    implementation: M::NAME.into(),
                    n,
                    threads,
                    secs,
                    lookups,
                    ns_per_lookup: threads as f64 * secs * 1e9 / lookups.max(1) as f64,
                    lookups_per_sec: lookups as f64 / secs,
                };
                eprintln!(
                    "win n={n:<6} T={threads:<2} {:<14} {:>9.1} ns/lookup/thread {:>10.3} M lookups/s",
                    M::NAME,
                    row.ns_per_lookup,
                    row.lookups_per_sec / 1e6
                );
                self.out.window_lookup.push(row);
            }
        }
    }

    /// Runs everything and writes the files.
    pub(crate) fn main() {
        let cfg = Config::from_env_and_args();
        let mut dir = results::results_dir();
        if cfg.smoke {
            dir.push("smoke");
        }
        let json = dir.join(results::MT_JSON);
        let mut out = MtResults {
            machine: machine::describe(),
            secs_per_point: cfg.secs,
            smoke: cfg.smoke,
            window_secs_per_point: cfg.secs,
            ..MtResults::default()
        };
        // Keep the part not run from the file already there.
        if !(cfg.run_throughput && cfg.run_window) {
            let old: Option<MtResults> = std::fs::read_to_string(&json)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
            if let Some(old) = old {
                eprintln!(
                    "mt: keeping the {} results of {} (measured {}, registry {})",
                    if cfg.run_window {
                        "throughput"
                    } else {
                        "window-lookup"
                    },
                    json.display(),
                    old.machine.date,
                    old.machine.registry_rev
                );
                if !cfg.run_throughput {
                    out.secs_per_point = old.secs_per_point;
                    out.throughput = old.throughput;
                    out.pass_latency = old.pass_latency;
                }
                if !cfg.run_window {
                    out.window_secs_per_point = old.window_secs_per_point;
                    out.window_lookup = old.window_lookup;
                }
            }
        }
        if cfg.run_throughput {
            for &n in &cfg.sizes {
                visit_all(&mut Run {
                    cfg: &cfg,
                    n,
                    out: &mut out,
                });
            }
        }
        if cfg.run_window {
            for &n in &cfg.window_sizes {
                visit_all(&mut WindowRun {
                    cfg: &cfg,
                    n,
                    out: &mut out,
                });
            }
        }
        std::fs::create_dir_all(&dir).expect("create the results folder");
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
