//! `segment-registry-demo`: a multi-threaded allocator workload.
//!
//! Without a GPU (or with `--sim`) it runs several simulated ranks, each
//! with its own allocator (one pool) and an application thread plus a comm
//! thread, over two comms; frees land while passes are blocked inside a
//! registration. It prints segments, windows, hand-backs, the simulator's
//! violation count (0 expected) and the time per operation, and exits
//! non-zero if anything leaked or a rule was broken.
//!
//! With `--real` (or when CUDA and NCCL ≥ 2.28 are found and `--sim` is not
//! given) it runs one rank on real NCCL: two one-rank comms on device 0.
//!
//! Options: `--sim`, `--real`, `--ranks N` (sim, 1-16), `--iters N`,
//! `--device N` (real).

use std::process::ExitCode;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use segment_registry_nccl::real::RealBackend;
use segment_registry_nccl::sim::{SimCall, SimOp, SimWorld};
use segment_registry_nccl::{Allocator, RawComm, MEM_GRANULARITY};

struct Options {
    mode: Option<bool>, // Some(true): real, Some(false): sim, None: auto
    ranks: usize,
    iters: usize,
    device: i32,
}

fn parse() -> Result<Options, String> {
    let mut o = Options {
        mode: None,
        ranks: 4,
        iters: 200,
        device: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<usize, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .ok_or(format!("{name} needs a number"))
        };
        match a.as_str() {
            "--sim" => o.mode = Some(false),
            "--real" => o.mode = Some(true),
            "--ranks" => o.ranks = num("--ranks")?.clamp(1, 16),
            "--iters" => o.iters = num("--iters")?.max(1),
            "--device" => o.device = i32::try_from(num("--device")?).map_err(|_| "bad --device")?,
            "-h" | "--help" => {
                return Err("usage: segment-registry-demo [--sim|--real] [--ranks N] \
                            [--iters N] [--device N]"
                    .into())
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(o)
}

/// xorshift64*: the same seed gives every rank the same program.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default)]
struct Timing {
    alloc: Duration,
    allocs: u64,
    free: Duration,
    frees: u64,
    pass: Duration,
    registered: u64,
}

impl Timing {
    fn add(&mut self, o: &Timing) {
        self.alloc += o.alloc;
        self.allocs += o.allocs;
        self.free += o.free;
        self.frees += o.frees;
        self.pass += o.pass;
        self.registered += o.registered;
    }

    fn print(&self) {
        let per = |d: Duration, n: u64| d.as_secs_f64() * 1e6 / n.max(1) as f64;
        println!(
            "  time per alloc        : {:.2} µs ({} allocs)",
            per(self.alloc, self.allocs),
            self.allocs
        );
        println!(
            "  time per free         : {:.2} µs ({} frees)",
            per(self.free, self.frees),
            self.frees
        );
        println!(
            "  time per registration : {:.2} µs (pass time per segment, {} registered)",
            per(self.pass, self.registered),
            self.registered
        );
    }
}

/// Per-rank rendezvous between the comm thread's registration (inside the
/// simulated NCCL call) and the application thread.
struct Signal {
    /// The simulator comm id whose first register this iteration parks.
    armed: Option<u64>,
    begun: Sender<()>,
    go: Receiver<()>,
}

fn run_sim(o: &Options) -> Result<bool, String> {
    const COMMS: usize = 2;
    let world = SimWorld::new(o.ranks);
    let all: Vec<usize> = (0..o.ranks).collect();
    let comms: Vec<Vec<RawComm>> = (0..COMMS)
        .map(|_| world.comm_create(&all).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let mut app_ends = Vec::new();
    let mut signals = Vec::new();
    for _ in 0..o.ranks {
        let (begun_tx, begun_rx) = channel();
        let (go_tx, go_rx) = channel();
        signals.push(Mutex::new(Signal {
            armed: None,
            begun: begun_tx,
            go: go_rx,
        }));
        app_ends.push((begun_rx, go_tx));
    }
    let signals = Arc::new(signals);
    {
        let signals = signals.clone();
        world.set_hook(Some(Arc::new(move |call: &SimCall| {
            if call.op != SimOp::Register {
                return;
            }
            let Some(m) = signals.get(call.rank) else {
                return;
            };
            let mut s = m.lock().unwrap_or_else(|e| e.into_inner());
            if s.armed == Some(call.comm_id) {
                s.armed = None;
                // The application frees while this registration blocks.
                let _ = s.begun.send(());
                let _ = s.go.recv();
            }
        })));
    }
    let last_comm = world.comm_id(comms[COMMS - 1][0]).ok_or("comm vanished")?;

    println!(
        "segment-registry-demo: simulated NCCL, {} ranks x 2 threads (app + comm), {COMMS} comms \
         sharing one pool per rank, {} iterations",
        o.ranks, o.iters
    );
    let t0 = Instant::now();
    let results: Vec<Result<(Timing, Allocator<_>), String>> = thread::scope(|s| {
        let handles: Vec<_> = app_ends
            .into_iter()
            .enumerate()
            .map(|(r, (begun, go))| {
                let (world, comms, signals) = (&world, &comms, &signals);
                s.spawn(move || {
                    let backend = world.rank(r).ok_or("no such rank")?;
                    let al = Allocator::new(backend);
                    for c in comms {
                        al.attach(c[r]).map_err(|e| e.to_string())?;
                    }
                    let mut t = Timing::default();
                    let mut rng = Rng(0x5eed_1234_abcd_0001);
                    let mut live: Vec<usize> = Vec::new();
                    for _ in 0..o.iters {
                        // The application allocates 1-4 segments.
                        let k = 1 + rng.below(4) as usize;
                        let mut fresh = Vec::with_capacity(k);
                        for _ in 0..k {
                            let size = (1 + rng.below(4) as usize) * MEM_GRANULARITY;
                            let a = Instant::now();
                            fresh.push(al.alloc(size, 0).map_err(|e| e.to_string())?);
                            t.alloc += a.elapsed();
                            t.allocs += 1;
                        }
                        // The comm thread runs the passes, in attach order;
                        // its first registration on the last comm parks.
                        signals[r].lock().map_err(|e| e.to_string())?.armed = Some(last_comm);
                        let pass = thread::scope(|s2| {
                            let p = s2.spawn(|| {
                                let a = Instant::now();
                                let res = al.register_all();
                                (a.elapsed(), res)
                            });
                            // Meanwhile: free one segment the pass holds and
                            // some older, registered ones.
                            begun.recv().map_err(|e| e.to_string())?;
                            let mut victims = vec![fresh.pop().ok_or("no segment")?];
                            let n = rng.below(3) as usize;
                            for _ in 0..n.min(live.len()) {
                                let i = rng.below(live.len() as u64) as usize;
                                victims.push(live.swap_remove(i));
                            }
                            for v in victims {
                                let a = Instant::now();
                                al.free(v).map_err(|e| e.to_string())?;
                                t.free += a.elapsed();
                                t.frees += 1;
                            }
                            go.send(()).map_err(|e| e.to_string())?;
                            p.join().map_err(|_| "comm thread panicked".to_string())
                        })?;
                        t.pass += pass.0;
                        for (id, res) in pass.1 {
                            let summary = res.map_err(|e| format!("{id}: {e}"))?;
                            t.registered += summary.registered.len() as u64;
                        }
                        live.extend(fresh);
                    }
                    for p in live {
                        let a = Instant::now();
                        al.free(p).map_err(|e| e.to_string())?;
                        t.free += a.elapsed();
                        t.frees += 1;
                    }
                    Ok((t, al))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("rank thread panicked".into()))
            })
            .collect()
    });
    let wall = t0.elapsed();
    world.set_hook(None);
    let mut timing = Timing::default();
    let mut stats = Vec::new();
    for (r, res) in results.into_iter().enumerate() {
        let (t, al) = res?;
        timing.add(&t);
        for (id, d) in al.detach_all() {
            d.map_err(|e| format!("detach {id}: {e}"))?;
        }
        for c in &comms {
            world.comm_destroy(c[r]).map_err(|e| e.to_string())?;
        }
        stats.push(al.stats());
    }
    let violations = world.verify();
    let sim = world.stats();
    let sum =
        |f: fn(&segment_registry_nccl::AllocatorStats) -> u64| -> u64 { stats.iter().map(f).sum() };
    let allocs = sum(|s| s.allocs);
    let mem_frees = sum(|s| s.mem_frees);
    let leaked = allocs != mem_frees || sim.live_allocs != 0 || sim.live_windows != 0;
    println!(
        "  segments allocated    : {allocs} (freed: {mem_frees}, live at end: {})",
        sim.live_allocs
    );
    println!(
        "  windows registered    : {} (deregistered: {}, live at end: {})",
        sum(|s| s.windows_registered),
        sum(|s| s.windows_deregistered),
        sim.live_windows
    );
    println!(
        "  handed back by passes : {} (freed while a pass held them)",
        sum(|s| s.handed_back)
    );
    println!(
        "  deregisters deferred  : {} (queued behind a registration in flight)",
        sum(|s| s.deregisters_deferred)
    );
    println!("  violations: {}", violations.len());
    for v in violations.iter().take(10) {
        println!("    {}: {v:?}", v.kind());
    }
    timing.print();
    println!("  wall time             : {:.3} s", wall.as_secs_f64());
    Ok(violations.is_empty() && !leaked)
}

fn run_real(o: &Options, backend: RealBackend) -> Result<bool, String> {
    let e = |e: segment_registry_nccl::BackendError| e.to_string();
    let version = backend.nccl_version();
    let (free0, total) = backend.mem_get_info(o.device).map_err(e)?;
    let c1 = backend.comm_init_one_rank(o.device).map_err(e)?;
    let c2 = backend.comm_init_one_rank(o.device).map_err(e)?;
    println!(
        "segment-registry-demo: real NCCL {}.{}.{}, device {}, one rank, 2 comms, {} iterations",
        version / 10000,
        version / 100 % 100,
        version % 100,
        o.device,
        o.iters
    );
    let al = Allocator::new(backend);
    let ids = [
        al.attach(c1).map_err(|e| e.to_string())?,
        al.attach(c2).map_err(|e| e.to_string())?,
    ];
    let mut t = Timing::default();
    let mut rng = Rng(7);
    let mut result = Ok(());
    for _ in 0..o.iters {
        let mut ptrs = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let size = (1 + rng.below(4) as usize) * MEM_GRANULARITY;
            let a = Instant::now();
            match al.alloc(size, o.device) {
                Ok(p) => ptrs.push(p),
                Err(err) => {
                    result = Err(err.to_string());
                    break;
                }
            }
            t.alloc += a.elapsed();
            t.allocs += 1;
        }
        let a = Instant::now();
        for (id, r) in al.register_all() {
            match r {
                Ok(s) => t.registered += s.registered.len() as u64,
                Err(err) => result = Err(format!("{id}: {err}")),
            }
        }
        t.pass += a.elapsed();
        for p in ptrs {
            let a = Instant::now();
            if let Err(err) = al.free(p) {
                result = Err(err.to_string());
            }
            t.free += a.elapsed();
            t.frees += 1;
        }
        if result.is_err() {
            break;
        }
    }
    let stats = al.stats();
    for id in ids {
        if let Err(err) = al.detach(id) {
            result = Err(err.to_string());
        }
    }
    for c in [c1, c2] {
        // SAFETY: made above, detached from the allocator, used by nobody
        // else, never used again.
        if let Err(err) = unsafe { al.backend().comm_destroy(c) } {
            result = Err(err.to_string());
        }
    }
    let (free1, _) = al.backend().mem_get_info(o.device).map_err(e)?;
    println!(
        "  segments allocated    : {} (freed: {})",
        stats.allocs, stats.mem_frees
    );
    println!(
        "  windows registered    : {} (null windows: {}, deregistered: {})",
        stats.windows_registered, stats.null_windows, stats.windows_deregistered
    );
    println!("  handed back by passes : {}", stats.handed_back);
    println!("  violations: 0 (real NCCL: rules enforced by the allocator, not checked)");
    t.print();
    println!(
        "  device memory         : {:.1} MiB free before, {:.1} MiB after (of {:.0} MiB)",
        free0 as f64 / 1048576.0,
        free1 as f64 / 1048576.0,
        total as f64 / 1048576.0
    );
    result?;
    Ok(stats.allocs == stats.mem_frees && stats.windows_registered == stats.windows_deregistered)
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let outcome = match o.mode {
        Some(false) => run_sim(&o),
        Some(true) => match RealBackend::new() {
            Ok(b) => run_real(&o, b),
            Err(e) => Err(format!("--real: {e}")),
        },
        None => match RealBackend::new() {
            Ok(b) if b.device_count().is_ok_and(|n| n > 0) => run_real(&o, b),
            Ok(_) => {
                println!("(no CUDA device: using the simulated NCCL)");
                run_sim(&o)
            }
            Err(e) => {
                println!("(real NCCL unavailable: {e}; using the simulated NCCL)");
                run_sim(&o)
            }
        },
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("FAILED: leaks or violations");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
