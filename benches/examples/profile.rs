//! Runs one operation of one implementation in a loop, for a profiler.
//!
//! ```text
//! profile IMPL OP N [ITERS]
//!   IMPL: registry | sglang-vec | mutex-btreemap | scc-treeindex | raw-skipmap
//!   OP:   track | untrack | lookup | by_address | by_seq | pass_none | pass_k25
//! ```
//!
//! Only the measured calls run inside functions named `measured_*`, so that
//! callgrind can count them alone:
//!
//! ```text
//! cargo build --profile bench -p segment-registry-benches --example profile
//! valgrind --tool=callgrind --toggle-collect='*measured_*' \
//!     target-bench/release/examples/profile registry untrack 100000 20000
//! callgrind_annotate --inclusive=yes callgrind.out.<pid>
//! ```
//!
//! The setup is the one the criterion benches use (same layouts, same
//! batches). It also prints wall time per operation, which is only a rough
//! figure (no warm-up, no statistics).

#[cfg(not(feature = "loom"))]
mod profile {
    use std::hint::black_box;
    use std::time::Instant;

    use segment_registry_benches::maps::{visit_all, ImplVisitor, SegmentMap};
    use segment_registry_benches::workload::{probes, Population};

    #[inline(never)]
    fn measured_track<M: SegmentMap>(m: &M, batch: &[(usize, usize)]) {
        for &(a, l) in batch {
            assert!(m.track(black_box(a), l));
        }
    }

    #[inline(never)]
    fn measured_untrack<M: SegmentMap>(m: &M, batch: &[(usize, usize)]) {
        for &(a, _) in batch {
            assert!(m.untrack(black_box(a)));
        }
    }

    #[inline(never)]
    fn measured_lookup<M: SegmentMap>(m: &M, probes: &[usize]) -> usize {
        probes
            .iter()
            .filter(|&&a| m.lookup(black_box(a)).is_some())
            .count()
    }

    #[inline(never)]
    fn measured_by_address<M: SegmentMap>(m: &M) -> usize {
        m.by_address()
    }

    #[inline(never)]
    fn measured_by_seq<M: SegmentMap>(m: &M) -> Option<usize> {
        m.by_seq()
    }

    #[inline(never)]
    fn measured_pass<M: SegmentMap>(m: &M, comm: u64) -> Option<usize> {
        m.pass(black_box(comm))
    }

    struct Run {
        imp: String,
        op: String,
        n: usize,
        iters: usize,
    }

    impl ImplVisitor for Run {
        fn visit<M: SegmentMap>(&mut self) {
            if self.imp != M::NAME {
                return;
            }
            let (n, iters) = (self.n, self.iters);
            let batch = 256.min(n / 4).max(1);
            let m = M::new();
            let mut pop = Population::populate(&m, n, batch, 0x5e6_2e61 ^ n as u64);
            let t = Instant::now();
            let mut timed = std::time::Duration::ZERO;
            let mut done = 0;
            // Times one measured call.
            let mut time = |f: &mut dyn FnMut()| {
                let t = Instant::now();
                f();
                timed += t.elapsed();
            };
            match self.op.as_str() {
                "track" => {
                    while done < iters {
                        let b = pop.pick_spare(batch);
                        time(&mut || measured_track(&m, &b));
                        pop.untrack_random(&m, batch);
                        done += batch;
                    }
                }
                "untrack" => {
                    while done < iters {
                        let b = pop.pick_live(batch);
                        time(&mut || measured_untrack(&m, &b));
                        pop.track_random(&m, batch);
                        done += batch;
                    }
                }
                "lookup" => {
                    let p = probes(&pop.live_segments(), 4096, 1);
                    while done < iters {
                        time(&mut || {
                            black_box(measured_lookup(&m, &p));
                        });
                        done += p.len();
                    }
                }
                "by_address" => {
                    while done < iters {
                        time(&mut || {
                            black_box(measured_by_address(&m));
                        });
                        done += 1;
                    }
                }
                "by_seq" => {
                    while done < iters {
                        time(&mut || {
                            black_box(measured_by_seq(&m));
                        });
                        done += 1;
                    }
                }
                "pass_none" | "pass_k25" => {
                    let comm = m.attach().expect("no passes here");
                    m.pass(comm);
                    while done < iters {
                        if self.op == "pass_k25" {
                            pop.make_pending(&m, 25.min(n));
                        }
                        time(&mut || {
                            black_box(measured_pass(&m, comm));
                        });
                        done += 1;
                    }
                }
                other => panic!("unknown op {other}"),
            }
            let el = t.elapsed();
            eprintln!(
                "{} {} n={n}: {done} ops, {:.1} ns/op measured ({el:?} in all)",
                M::NAME,
                self.op,
                timed.as_nanos() as f64 / done as f64
            );
        }
    }

    pub(crate) fn main() {
        let a: Vec<String> = std::env::args().skip(1).collect();
        if a.len() < 3 {
            eprintln!("usage: profile IMPL OP N [ITERS]");
            std::process::exit(2);
        }
        let mut run = Run {
            imp: a[0].clone(),
            op: a[1].clone(),
            n: a[2].parse().expect("N"),
            iters: a.get(3).map_or(100_000, |s| s.parse().expect("ITERS")),
        };
        visit_all(&mut run);
    }
}

#[cfg(not(feature = "loom"))]
fn main() {
    profile::main();
}

#[cfg(feature = "loom")]
fn main() {}
