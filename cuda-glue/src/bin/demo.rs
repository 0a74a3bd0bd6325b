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
//! Comms are attached *checked* (their passes agree on what they register
//! first; `--unchecked` attaches them as before). Two fault scenarios run
//! on simulated ranks (`demo/faults.rs`): `--diverge` (a rank allocates one
//! segment more: every rank gets the typed `Diverged`, the rank frees the
//! extra, the next pass registers) and `--stall` (a registration rendezvous
//! never completes: the deadline ends it with `Timeout` on every rank, the
//! comm is aborted, the accounting stays exact). Both exit 0 when all of it
//! happened as it should.
//!
//! Options: `--sim`, `--real`, `--ranks N` (sim, 1-16), `--iters N`,
//! `--device N` (real), `--unchecked`, `--diverge`, `--stall`,
//! `--deadline-ms N` (`--stall`, default 200).

#[path = "demo/faults.rs"]
mod faults;

use std::process::ExitCode;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use segment_registry_nccl::real::RealBackend;
use segment_registry_nccl::sim::{SimBackend, SimCall, SimOp, SimWorld};
use segment_registry_nccl::{
    Allocator, AllocatorStats, AttachOptions, Backend, BackendError, CommId, RawComm,
    MEM_GRANULARITY,
};

/// Which run the demo makes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// The allocator workload (sim or real).
    Workload,
    /// `--diverge`.
    Diverge,
    /// `--stall`.
    Stall,
}

struct Options {
    mode: Option<bool>, // Some(true): real, Some(false): sim, None: auto
    ranks: usize,
    iters: usize,
    device: i32,
    checked: bool,
    scenario: Scenario,
    deadline: Duration,
}

impl Options {
    /// How the workload attaches its comms.
    fn attach_options(&self) -> AttachOptions {
        let opts = AttachOptions::new().deadline(Duration::from_secs(60));
        if self.checked {
            opts.checked()
        } else {
            opts
        }
    }
}

fn parse() -> Result<Options, String> {
    let mut o = Options {
        mode: None,
        ranks: 4,
        iters: 200,
        device: 0,
        checked: true,
        scenario: Scenario::Workload,
        deadline: Duration::from_millis(200),
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
            "--unchecked" => o.checked = false,
            "--diverge" => o.scenario = Scenario::Diverge,
            "--stall" => o.scenario = Scenario::Stall,
            "--deadline-ms" => {
                o.deadline = Duration::from_millis(num("--deadline-ms")?.max(1) as u64)
            }
            "-h" | "--help" => {
                return Err("usage: segment-registry-demo [--sim|--real] [--ranks N] \
                            [--iters N] [--device N] [--unchecked] \
                            [--diverge | --stall [--deadline-ms N]]"
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
    /// `alloc`, timed.
    fn timed_alloc<B: Backend>(
        &mut self,
        al: &Allocator<B>,
        size: usize,
        device: i32,
    ) -> Result<usize, String> {
        let a = Instant::now();
        let r = al.alloc(size, device).map_err(|e| e.to_string());
        self.alloc += a.elapsed();
        self.allocs += 1;
        r
    }

    /// `free`, timed.
    fn timed_free<B: Backend>(&mut self, al: &Allocator<B>, ptr: usize) -> Result<(), String> {
        let a = Instant::now();
        let r = al.free(ptr).map(drop).map_err(|e| e.to_string());
        self.free += a.elapsed();
        self.frees += 1;
        r
    }

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

/// The application thread's side of its rank's rendezvous.
struct AppEnd {
    /// A registration is parked inside the simulated NCCL call.
    begun: Receiver<()>,
    /// Lets it go on.
    go: Sender<()>,
}

/// What one rank's application thread carries from iteration to iteration.
struct RankWork {
    t: Timing,
    rng: Rng,
    live: Vec<usize>,
}

/// The simulated job: the world, its comms (each rank's handle of each),
/// and the rendezvous of every rank.
struct SimJob {
    world: Arc<SimWorld>,
    comms: Vec<Vec<RawComm>>,
    signals: Arc<Vec<Mutex<Signal>>>,
    /// The comm whose registration parks each iteration (the last one).
    parked_comm: u64,
}

const SIM_COMMS: usize = 2;

fn run_sim(o: &Options) -> Result<bool, String> {
    let (job, ends) = SimJob::new(o.ranks)?;
    println!(
        "segment-registry-demo: simulated NCCL, {} ranks x 2 threads (app + comm), {SIM_COMMS} \
         {} comms sharing one pool per rank, {} iterations",
        o.ranks,
        if o.checked { "checked" } else { "unchecked" },
        o.iters
    );
    let t0 = Instant::now();
    let results: Vec<Result<(Timing, Allocator<SimBackend>), String>> = thread::scope(|s| {
        let job = &job;
        let handles: Vec<_> = ends
            .into_iter()
            .enumerate()
            .map(|(r, end)| s.spawn(move || job.run_rank(r, &end, o)))
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
    job.world.set_hook(None);
    let (timing, stats) = job.finish(results)?;
    Ok(job.report(&timing, &stats, wall))
}

impl SimJob {
    /// A world of `ranks` ranks, its comms, and the hook that parks each
    /// rank's armed registration until the application has freed.
    fn new(ranks: usize) -> Result<(SimJob, Vec<AppEnd>), String> {
        let world = SimWorld::new(ranks);
        let all: Vec<usize> = (0..ranks).collect();
        let comms: Vec<Vec<RawComm>> = (0..SIM_COMMS)
            .map(|_| world.comm_create(&all).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let mut ends = Vec::new();
        let mut signals = Vec::new();
        for _ in 0..ranks {
            let (begun_tx, begun_rx) = channel();
            let (go_tx, go_rx) = channel();
            signals.push(Mutex::new(Signal {
                armed: None,
                begun: begun_tx,
                go: go_rx,
            }));
            ends.push(AppEnd {
                begun: begun_rx,
                go: go_tx,
            });
        }
        let parked_comm = world
            .comm_id(comms[SIM_COMMS - 1][0])
            .ok_or("comm vanished")?;
        let job = SimJob {
            world,
            comms,
            signals: Arc::new(signals),
            parked_comm,
        };
        job.install_hook();
        Ok((job, ends))
    }

    fn install_hook(&self) {
        let signals = self.signals.clone();
        self.world.set_hook(Some(Arc::new(move |call: &SimCall| {
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

    /// Rank `r`'s application thread: its allocator on both comms, the
    /// iterations, then every segment still live freed.
    fn run_rank(
        &self,
        r: usize,
        end: &AppEnd,
        o: &Options,
    ) -> Result<(Timing, Allocator<SimBackend>), String> {
        let backend = self.world.rank(r).ok_or("no such rank")?;
        let al = Allocator::new(backend);
        for c in &self.comms {
            // On this rank's thread: a checked attach is collective.
            al.attach_with(c[r], o.attach_options())
                .map_err(|e| e.to_string())?;
        }
        let mut w = RankWork {
            t: Timing::default(),
            rng: Rng(0x5eed_1234_abcd_0001),
            live: Vec::new(),
        };
        for _ in 0..o.iters {
            self.iteration(r, &al, end, &mut w)?;
        }
        for p in std::mem::take(&mut w.live) {
            w.t.timed_free(&al, p)?;
        }
        Ok((w.t, al))
    }

    /// One iteration: the application allocates 1-4 segments; the comm
    /// thread runs the passes, in attach order, and its first registration
    /// on the last comm parks while the application frees one segment the
    /// pass holds and some older, registered ones.
    fn iteration(
        &self,
        r: usize,
        al: &Allocator<SimBackend>,
        end: &AppEnd,
        w: &mut RankWork,
    ) -> Result<(), String> {
        let k = 1 + w.rng.below(4) as usize;
        let mut fresh = Vec::with_capacity(k);
        for _ in 0..k {
            let size = (1 + w.rng.below(4) as usize) * MEM_GRANULARITY;
            fresh.push(w.t.timed_alloc(al, size, 0)?);
        }
        lock(&self.signals[r]).armed = Some(self.parked_comm);
        let (elapsed, passes) = thread::scope(|s| {
            let p = s.spawn(|| {
                let a = Instant::now();
                let res = al.register_all();
                (a.elapsed(), res)
            });
            end.begun.recv().map_err(|e| e.to_string())?;
            let mut victims = vec![fresh.pop().ok_or("no segment")?];
            let n = w.rng.below(3) as usize;
            for _ in 0..n.min(w.live.len()) {
                let i = w.rng.below(w.live.len() as u64) as usize;
                victims.push(w.live.swap_remove(i));
            }
            for v in victims {
                w.t.timed_free(al, v)?;
            }
            end.go.send(()).map_err(|e| e.to_string())?;
            p.join().map_err(|_| "comm thread panicked".to_string())
        })?;
        w.t.pass += elapsed;
        for (id, res) in passes {
            let summary = res.map_err(|e| format!("{id}: {e}"))?;
            w.t.registered += summary.registered.len() as u64;
        }
        w.live.extend(fresh);
        Ok(())
    }

    /// Detaches every rank's comms, destroys them, and gathers the timing
    /// and each allocator's figures.
    fn finish(
        &self,
        results: Vec<Result<(Timing, Allocator<SimBackend>), String>>,
    ) -> Result<(Timing, Vec<AllocatorStats>), String> {
        let mut timing = Timing::default();
        let mut stats = Vec::new();
        for (r, res) in results.into_iter().enumerate() {
            let (t, al) = res?;
            timing.add(&t);
            for (id, d) in al.detach_all() {
                d.map_err(|e| format!("detach {id}: {e}"))?;
            }
            for c in &self.comms {
                self.world.comm_destroy(c[r]).map_err(|e| e.to_string())?;
            }
            stats.push(al.stats());
        }
        Ok((timing, stats))
    }

    /// Prints the figures; `true` if nothing leaked and no rule was broken.
    fn report(&self, timing: &Timing, stats: &[AllocatorStats], wall: Duration) -> bool {
        let violations = self.world.verify();
        let sim = self.world.stats();
        let sum = |f: fn(&AllocatorStats) -> u64| -> u64 { stats.iter().map(f).sum() };
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
        violations.is_empty() && !leaked
    }
}

/// The two one-rank comms of the real run.
const REAL_COMMS: usize = 2;

fn run_real(o: &Options, backend: RealBackend) -> Result<bool, String> {
    let e = |e: BackendError| e.to_string();
    let version = backend.nccl_version();
    let (free0, total) = backend.mem_get_info(o.device).map_err(e)?;
    let mut raws = [RawComm(0); REAL_COMMS];
    for raw in &mut raws {
        *raw = backend.comm_init_one_rank(o.device).map_err(e)?;
    }
    println!(
        "segment-registry-demo: real NCCL {}.{}.{}, device {}, one rank, {REAL_COMMS} comms, {} \
         iterations",
        version / 10000,
        version / 100 % 100,
        version % 100,
        o.device,
        o.iters
    );
    let al = Allocator::new(backend);
    let mut ids = Vec::new();
    for raw in raws {
        ids.push(
            al.attach_with(raw, o.attach_options())
                .map_err(|e| e.to_string())?,
        );
    }
    let mut t = Timing::default();
    let mut rng = Rng(7);
    let mut result = Ok(());
    for _ in 0..o.iters {
        result = real_iteration(&al, o.device, &mut rng, &mut t);
        if result.is_err() {
            break;
        }
    }
    let stats = al.stats();
    if let Err(err) = real_teardown(&al, &ids, raws) {
        result = Err(err);
    }
    let (free1, _) = al.backend().mem_get_info(o.device).map_err(e)?;
    print_real_report(&stats, &t, free0, free1, total);
    result?;
    Ok(stats.allocs == stats.mem_frees && stats.windows_registered == stats.windows_deregistered)
}

/// One iteration on real NCCL: 1-3 allocations, a pass over both comms,
/// the frees. Every step runs; the last error is returned.
fn real_iteration(
    al: &Allocator<RealBackend>,
    device: i32,
    rng: &mut Rng,
    t: &mut Timing,
) -> Result<(), String> {
    let mut result = Ok(());
    let mut ptrs = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let size = (1 + rng.below(4) as usize) * MEM_GRANULARITY;
        match t.timed_alloc(al, size, device) {
            Ok(p) => ptrs.push(p),
            Err(err) => {
                result = Err(err);
                break;
            }
        }
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
        if let Err(err) = t.timed_free(al, p) {
            result = Err(err);
        }
    }
    result
}

/// Detaches the comms and destroys them; the last error, if any.
fn real_teardown(
    al: &Allocator<RealBackend>,
    ids: &[CommId],
    raws: [RawComm; REAL_COMMS],
) -> Result<(), String> {
    let mut result = Ok(());
    for &id in ids {
        if let Err(err) = al.detach(id) {
            result = Err(err.to_string());
        }
    }
    for c in raws {
        // SAFETY: made by `run_real`, detached from the allocator just
        // above, used by nobody else, never used again.
        if let Err(err) = unsafe { al.backend().comm_destroy(c) } {
            result = Err(err.to_string());
        }
    }
    result
}

fn print_real_report(stats: &AllocatorStats, t: &Timing, free0: usize, free1: usize, total: usize) {
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
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let outcome = match (o.scenario, o.mode) {
        (Scenario::Diverge, _) => faults::run_diverge(o.ranks),
        (Scenario::Stall, _) => faults::run_stall(o.ranks, o.deadline),
        (_, mode) => run_workload(&o, mode),
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

/// The allocator workload, on real NCCL or simulated.
fn run_workload(o: &Options, mode: Option<bool>) -> Result<bool, String> {
    match mode {
        Some(false) => run_sim(o),
        Some(true) => match RealBackend::new() {
            Ok(b) => run_real(o, b),
            Err(e) => Err(format!("--real: {e}")),
        },
        None => match RealBackend::new() {
            Ok(b) if b.device_count().is_ok_and(|n| n > 0) => run_real(o, b),
            Ok(_) => {
                println!("(no CUDA device: using the simulated NCCL)");
                run_sim(o)
            }
            Err(e) => {
                println!("(real NCCL unavailable: {e}; using the simulated NCCL)");
                run_sim(o)
            }
        },
    }
}
