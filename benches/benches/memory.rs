//! Heap bytes per live segment, through a counting global allocator (a
//! `harness = false` binary).
//!
//! For each implementation and n = 1,000 and 100,000: the bytes the map
//! holds once n segments are tracked; after 2n untrack + track round trips
//! of random live segments (the registry's reclamation flushed first); and,
//! where passes exist, after one comm registered every segment (the
//! registry then keeps one window record per segment, `mutex-btreemap` one
//! `(comm, window)` pair; the other baselines keep none). Requested sizes
//! are counted, not the allocator's own overhead.
//!
//! Flags: `--bench` (given by `cargo bench`; without it, or with `--test`,
//! only n = 1,000 is measured). Writes `memory.json` to the results folder.

#[cfg(not(feature = "loom"))]
mod memory {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use segment_registry_benches::maps::{visit_all, ImplVisitor, SegmentMap};
    use segment_registry_benches::results::{self, MemoryResults, MemoryRow};
    use segment_registry_benches::workload::{layout, machine, Rng, GRANULE, VA_BASE};

    /// Bytes currently allocated through the global allocator.
    static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

    /// Forwards to the system allocator and counts live bytes.
    pub(crate) struct Counting;

    // SAFETY: every method forwards to `System` with the caller's arguments
    // unchanged, so `System`'s guarantees are ours; the counter is only a
    // statistic.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the caller upholds `alloc`'s contract.
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                // Relaxed: a statistic.
                ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
            }
            p
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the caller upholds `alloc_zeroed`'s contract.
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                // Relaxed: a statistic.
                ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
            }
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: the caller upholds `dealloc`'s contract.
            unsafe { System.dealloc(ptr, layout) };
            // Relaxed: a statistic.
            ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: the caller upholds `realloc`'s contract.
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                // Relaxed: a statistic.
                ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
                ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
            }
            p
        }
    }

    fn allocated() -> usize {
        // Relaxed: a statistic (this binary is single-threaded).
        ALLOCATED.load(Ordering::Relaxed)
    }

    /// Lets deferred frees run (see [`SegmentMap::settle`]).
    fn settle<M: SegmentMap>(m: &M) {
        m.settle();
    }

    struct Measure<'a> {
        sizes: &'a [usize],
        rows: &'a mut Vec<MemoryRow>,
    }

    impl ImplVisitor for Measure<'_> {
        fn visit<M: SegmentMap>(&mut self) {
            // Prime the thread-locals (epoch handles and the like) that the
            // first use of an implementation allocates once per thread.
            {
                let w = M::new();
                assert!(w.track(VA_BASE, GRANULE) && w.untrack(VA_BASE));
                settle(&w);
            }
            for &n in self.sizes {
                // Everything the measurement itself needs is allocated first.
                let slots = layout(n, 0x006d_656d ^ n as u64);
                let mut order: Vec<usize> = (0..n).collect();
                let mut rng = Rng::new(n as u64);
                rng.shuffle(&mut order);
                let churn: Vec<usize> = (0..2 * n).map(|_| rng.below(n)).collect();
                let mut phases: Vec<(&str, usize)> = Vec::with_capacity(3);

                let before = allocated();
                let m = M::new();
                for &i in &order {
                    let (a, l) = slots[i];
                    assert!(m.track(a, l), "{}: track refused", M::NAME);
                }
                settle(&m);
                phases.push(("tracked", allocated() - before));
                for &i in &churn {
                    let (a, l) = slots[i];
                    assert!(m.untrack(a) && m.track(a, l), "{}: churn refused", M::NAME);
                }
                settle(&m);
                phases.push(("after churn", allocated() - before));
                if let Some(comm) = m.attach() {
                    assert_eq!(m.pass(comm), Some(n));
                    settle(&m);
                    phases.push(("1 comm registered", allocated() - before));
                }
                drop(m);
                for (phase, bytes) in phases {
                    let per = bytes as f64 / n as f64;
                    eprintln!(
                        "mem n={n:<6} {:<14} {phase:<18} {per:>8.1} B/segment",
                        M::NAME
                    );
                    self.rows.push(MemoryRow {
                        implementation: M::NAME.into(),
                        n,
                        phase: phase.into(),
                        bytes: bytes as u64,
                        bytes_per_segment: per,
                    });
                }
            }
        }
    }

    /// Measures everything and writes `memory.json`.
    pub(crate) fn main() {
        let args: Vec<String> = std::env::args().collect();
        let smoke = args.iter().any(|a| a == "--test") || !args.iter().any(|a| a == "--bench");
        let sizes: &[usize] = if smoke { &[1_000] } else { &[1_000, 100_000] };
        let mut out = MemoryResults {
            machine: machine::describe(),
            smoke,
            rows: Vec::new(),
        };
        visit_all(&mut Measure {
            sizes,
            rows: &mut out.rows,
        });
        let mut dir = results::results_dir();
        if smoke {
            dir.push("smoke");
        }
        std::fs::create_dir_all(&dir).expect("create the results folder");
        let path = dir.join(results::MEMORY_JSON);
        std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap())
            .expect("write memory.json");
        eprintln!("memory: wrote {}", path.display());
    }
}

#[cfg(not(feature = "loom"))]
#[global_allocator]
static GLOBAL: memory::Counting = memory::Counting;

#[cfg(not(feature = "loom"))]
fn main() {
    memory::main();
}

#[cfg(feature = "loom")]
fn main() {}
