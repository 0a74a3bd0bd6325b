//! `segment-registry-two-ranks`: the real collective registration, one
//! process per GPU (issue 8).
//!
//! Every rank runs the workload of `two_ranks/workload.rs` on real NCCL:
//! two comms, A and B, over the same ranks, both sharing the rank's one
//! allocator (one pool); same allocations on every rank, frees, address
//! reuse, a pass for A then for B at the end of each region, all-reduces on
//! the registered buffers with checked sums, frees that deregister first,
//! and flat counts and device memory over the cycles.
//!
//! * Rank and world size: `--rank`/`--world-size`, else `RANK`/`WORLD_SIZE`.
//! * The NCCL unique ids go through a file in `--dir` (else
//!   `SEGREG_RUN_DIR`): rank 0 writes it atomically (and refuses a stale
//!   one: use a fresh folder per run); the others poll for it.
//! * Each rank writes its registration log `regs.rank<R>.log` (one line per
//!   `ncclCommWindowRegister`: cycle, pass, comm, seq, size, buffer) and
//!   `status.rank<R>`; rank 0 waits for the others' and compares the logs
//!   (same count, same order).
//! * A watchdog ends the process with status 124 after `--timeout` seconds
//!   (default 180), naming the step it was in: nothing hangs.
//! * Device: `--device`, else `SEGREG_DEVICE`, else `LOCAL_RANK` (or the
//!   rank) when that many devices are visible, else 0 (one visible device
//!   per process, as `CUDA_VISIBLE_DEVICES=<rank>` gives).
//! * `--cycles N` (default 40), `--warmup N` (cycles before the device
//!   memory baseline, default 3), `--tolerance-mib M` (allowed loss of free
//!   device memory from the baseline to the end, default 32). On the
//!   2×H100 host NCCL's own lazily made buffers moved free memory by up to
//!   14 MiB between cycles, in both directions, with no segment of ours
//!   outstanding; a leak of the smallest segment (one 2 MiB granule) per
//!   cycle would lose 74 MiB over the 37 measured cycles.
//!
//! * `--control-swap`: the negative control. Ranks other than 0 allocate
//!   two buffers of different sizes in the opposite order: the collective
//!   registrations then differ, and the run must fail (an NCCL error, the
//!   log comparison, or the watchdog), never hang.
//!
//! * `--scenario diverge|deadline|costs`: a never-hang scenario on two
//!   non-blocking comms instead of the workload (`two_ranks/never_hang.rs`),
//!   every call on them under `--call-deadline` seconds (default 20);
//!   `--cycles` is then the costs scenario's iteration count.
//!
//! Exit status: 0 pass, 1 failure, 2 usage, 124 timeout. Launch both ranks
//! with `multi-gpu/run-two-ranks.sh` (the workload) or
//! `multi-gpu/run-never-hang.sh` (the scenarios).

#[path = "two_ranks/exchange.rs"]
mod exchange;
#[path = "two_ranks/never_hang.rs"]
mod never_hang;
#[path = "two_ranks/workload.rs"]
mod workload;

use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use exchange::{exchange_ids, wait_for_file, write_atomic};
use segment_registry_nccl::real::{RealBackend, UniqueId};
use segment_registry_nccl::{Allocator, RawComm};
use workload::{compare_logs, DataPath, Env, Plan, Report, Traced, COMMS};

const MIB: f64 = 1048576.0;

#[derive(Debug)]
struct Options {
    rank: usize,
    world: usize,
    device: Option<i32>,
    dir: PathBuf,
    cycles: usize,
    warmup: usize,
    timeout: Duration,
    tolerance_mib: f64,
    control_swap: bool,
    /// A never-hang scenario instead of the workload.
    scenario: Option<never_hang::Scenario>,
    /// The deadline of every call on the scenarios' comms.
    call_deadline: Duration,
}

const USAGE: &str = "usage: segment-registry-two-ranks --dir DIR [--rank R] [--world-size N] \
[--device D] [--cycles N] [--warmup N] [--timeout SECONDS] [--tolerance-mib M] \
[--control-swap] [--scenario diverge|deadline|costs] [--call-deadline SECONDS]\n\
(rank and world size default to $RANK and $WORLD_SIZE, DIR to $SEGREG_RUN_DIR)";

fn env_num<T: std::str::FromStr>(name: &str) -> Result<Option<T>, String> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("${name}={v:?} is not a number")),
        Err(_) => Ok(None),
    }
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
    let mut rank: Option<usize> = env_num("RANK")?;
    let mut world: Option<usize> = env_num("WORLD_SIZE")?;
    let mut device: Option<i32> = env_num("SEGREG_DEVICE")?;
    let mut dir = std::env::var_os("SEGREG_RUN_DIR").map(PathBuf::from);
    let (mut cycles, mut warmup, mut timeout, mut tolerance) = (40, 3, 180.0f64, 32.0f64);
    let mut control_swap = false;
    let (mut scenario, mut call_deadline) = (None, 20.0f64);
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        let num = |v: String| -> Result<f64, String> {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or(format!("{a}: {v:?} is not a number"))
        };
        match a.as_str() {
            "--rank" => rank = Some(num(value()?)? as usize),
            "--world-size" => world = Some(num(value()?)? as usize),
            "--device" => device = Some(num(value()?)? as i32),
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--cycles" => cycles = num(value()?)? as usize,
            "--warmup" => warmup = num(value()?)? as usize,
            "--timeout" => timeout = num(value()?)?,
            "--tolerance-mib" => tolerance = num(value()?)?,
            "--control-swap" => control_swap = true,
            "--scenario" => scenario = Some(never_hang::Scenario::parse(&value()?)?),
            "--call-deadline" => call_deadline = num(value()?)?,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let rank = rank.ok_or(format!("no rank: pass --rank or set $RANK\n{USAGE}"))?;
    let world = world.unwrap_or(2);
    if world < 1 || rank >= world {
        return Err(format!("rank {rank} of a world of {world}"));
    }
    if i32::try_from(world).is_err() {
        return Err(format!("world size {world} is too large"));
    }
    Ok(Options {
        rank,
        world,
        device,
        dir: dir.ok_or(format!("no exchange folder: pass --dir\n{USAGE}"))?,
        cycles: cycles.max(1),
        warmup,
        timeout: Duration::from_secs_f64(timeout.clamp(1.0, 86400.0)),
        tolerance_mib: tolerance,
        control_swap,
        scenario,
        call_deadline: Duration::from_secs_f64(call_deadline.clamp(0.1, 3600.0)),
    })
}

/// The step a rank is in, for the watchdog's message.
#[derive(Clone)]
struct Phase(Arc<Mutex<String>>);

impl Phase {
    fn set(&self, s: &str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = s.to_string();
    }

    fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Ends the process with status 124 at `deadline`: a collective whose peer
/// never comes (NCCL blocks forever) cannot outlive it.
fn start_watchdog(rank: usize, deadline: Instant, timeout: Duration, phase: Phase) {
    thread::spawn(move || {
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            thread::sleep(left.min(Duration::from_millis(200)));
        }
        eprintln!(
            "rank {rank}: TIMEOUT after {:.0} s, in step: {}",
            timeout.as_secs_f64(),
            phase.get()
        );
        std::process::exit(124);
    });
}

/// The device this rank uses (see the module docs).
fn pick_device(o: &Options, b: &RealBackend) -> Result<i32, String> {
    if let Some(d) = o.device {
        return Ok(d);
    }
    let count = b.device_count().map_err(|e| e.to_string())?;
    if count < 1 {
        return Err("no CUDA device visible".into());
    }
    let local: usize = env_num("LOCAL_RANK")?.unwrap_or(o.rank);
    Ok(match i32::try_from(local) {
        Ok(l) if l < count => l,
        _ => 0,
    })
}

struct RealEnv {
    al: Allocator<Traced<RealBackend>>,
    rank: usize,
    world: usize,
    device: i32,
    comms: [RawComm; 2],
}

impl RealEnv {
    fn backend(&self) -> &RealBackend {
        self.al.backend().inner()
    }

    /// Checks that `[ptr, ptr + bytes)` lies in one live allocation of this
    /// rank's allocator (on `self.device`): what the unsafe copies and
    /// all-reduces below require.
    fn check_span(&self, ptr: usize, bytes: usize) -> Result<(), String> {
        match self.al.find(ptr) {
            Some(s) if ptr.checked_add(bytes).is_some_and(|end| end <= s.end()) => Ok(()),
            _ => Err(format!(
                "[{ptr:#x}, +{bytes}) is not inside a live allocation"
            )),
        }
    }
}

impl DataPath for RealEnv {
    fn fill(&self, ptr: usize, data: &[f32]) -> Result<(), String> {
        self.check_span(ptr, std::mem::size_of_val(data))?;
        // SAFETY: checked just above: the span is live ncclMemAlloc memory
        // of this rank's device, and this rank's only thread frees it.
        unsafe { self.backend().copy_to_device_f32(self.device, ptr, data) }
            .map_err(|e| e.to_string())
    }

    fn all_reduce(
        &self,
        comm: RawComm,
        src: usize,
        dst: usize,
        count: usize,
    ) -> Result<(), String> {
        let bytes = count.checked_mul(4).ok_or("count overflows")?;
        self.check_span(src, bytes)?;
        self.check_span(dst, bytes)?;
        if !self.comms.contains(&comm) {
            return Err(format!("{comm:?} is not one of this rank's comms"));
        }
        // SAFETY: `comm` is one of the two live comms this process made on
        // `self.device` (destroyed only after the workload); both spans
        // were checked above; this thread makes every NCCL call on it.
        unsafe { self.backend().all_reduce_sum_f32(comm, src, dst, count) }
            .map_err(|e| e.to_string())
    }

    fn read(&self, ptr: usize, n: usize) -> Result<Vec<f32>, String> {
        self.check_span(ptr, n.checked_mul(4).ok_or("count overflows")?)?;
        // SAFETY: checked just above (see `fill`).
        unsafe { self.backend().copy_from_device_f32(self.device, ptr, n) }
            .map_err(|e| e.to_string())
    }
}

impl Env for RealEnv {
    type B = RealBackend;

    fn allocator(&self) -> &Allocator<Traced<RealBackend>> {
        &self.al
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn nranks(&self) -> usize {
        self.world
    }

    fn device(&self) -> i32 {
        self.device
    }

    fn data(&self) -> Option<&dyn DataPath> {
        Some(self)
    }

    fn free_device_bytes(&self) -> Result<Option<usize>, String> {
        self.backend()
            .mem_get_info(self.device)
            .map(|(free, _)| Some(free))
            .map_err(|e| e.to_string())
    }
}

/// Free device memory lost from the end of the warm-up to the end, in MiB
/// (`None`: too few cycles for a baseline).
fn memory_loss(report: &Report, warmup: usize) -> Option<(f64, f64, f64)> {
    let base = report
        .cycles
        .get(warmup.checked_sub(1)?)?
        .free_device_bytes?;
    let end = report.cycles.last()?.free_device_bytes?;
    if report.cycles.len() <= warmup {
        return None;
    }
    Some((
        base as f64 / MIB,
        end as f64 / MIB,
        (base as f64 - end as f64) / MIB,
    ))
}

fn run(o: &Options, phase: &Phase, deadline: Instant) -> Result<(), String> {
    let say = |s: &str| phase.set(s);
    let env = setup(o, &say, deadline)?;
    // Negative control: every rank but 0 allocates region 1's x and y in
    // the opposite order, so the collective registrations differ.
    let plan = Plan {
        cycles: o.cycles,
        swap: (o.control_swap && o.rank != 0).then_some((0, 1)),
    };
    let started = Instant::now();
    let (rep, outcome) = workload::run(&env, env.comms, &plan, &say);
    let elapsed = started.elapsed();

    // Log and status, whatever happened (rank 0 waits for them); after a
    // failure the log holds the passes that completed.
    let lines = rep.log_lines();
    write_log(o, &lines)?;
    let mut problems: Vec<String> = Vec::new();
    if let Err(e) = &outcome {
        problems.push(format!("workload: {e}"));
    } else {
        print_summary(o.rank, &rep, elapsed);
        problems.extend(check_memory(o, &rep));
    }
    write_status(o, &problems)?;
    if o.rank == 0 {
        say("waiting for the other ranks' logs");
        problems.extend(compare_peer_logs(o, deadline, &lines, outcome.is_ok())?);
    }

    // Destroy the comms (the workload detached them) only after a clean
    // run: after a failure a comm may still hold windows or a peer may be
    // gone; process exit cleans up.
    if outcome.is_ok() {
        say("ncclCommDestroy");
        for c in env.comms {
            // SAFETY: made by `setup` in this process, detached from the
            // allocator by the workload, used by nobody else, never again.
            unsafe { env.backend().comm_destroy(c) }.map_err(|e| e.to_string())?;
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n  "))
    }
}

/// Loads CUDA and NCCL, picks the device, exchanges the unique ids and
/// makes comms A and B on it (each checked against NCCL's count and rank).
fn setup(o: &Options, say: &dyn Fn(&str), deadline: Instant) -> Result<RealEnv, String> {
    let r = o.rank;
    say("loading CUDA and NCCL");
    let backend = RealBackend::new().map_err(|e| e.to_string())?;
    let device = pick_device(o, &backend)?;
    let v = backend.nccl_version();
    println!(
        "rank {r}/{}: NCCL {}.{}.{}, device {device} of {}, pid {}",
        o.world,
        v / 10000,
        v / 100 % 100,
        v % 100,
        backend.device_count().unwrap_or(-1),
        std::process::id()
    );
    say("exchanging the NCCL unique ids");
    let ids = exchange_ids(&o.dir, (o.rank, o.world), &backend, deadline)?;
    let mut comms = [RawComm(0); 2];
    for (i, id) in ids.iter().enumerate() {
        say(&format!("ncclCommInitRank for comm {}", COMMS[i]));
        comms[i] =
            init_comm(o, &backend, device, id).map_err(|e| format!("comm {}: {e}", COMMS[i]))?;
    }
    println!(
        "rank {r}: comms A {:?} and B {:?} ready",
        comms[0], comms[1]
    );
    Ok(RealEnv {
        al: Allocator::new(Traced::new(backend)),
        rank: r,
        world: o.world,
        device,
        comms,
    })
}

/// Joins this rank's comm of the id on `device`, and checks that NCCL
/// agrees on its size and on this rank.
fn init_comm(o: &Options, b: &RealBackend, device: i32, id: &UniqueId) -> Result<RawComm, String> {
    // World size fits i32 (checked by `parse`); rank < world.
    let (world, rank) = (o.world as i32, o.rank as i32);
    let c = b
        .comm_init_rank(device, world, rank, id)
        .map_err(|e| e.to_string())?;
    // SAFETY: `c` was just made by this process and is live.
    let info = unsafe { b.comm_rank_info(c) }.map_err(|e| e.to_string())?;
    if info != (world, rank) {
        return Err(format!("NCCL says (count, rank) = {info:?}"));
    }
    Ok(c)
}

/// This rank's registration log, `regs.rank<R>.log`.
fn write_log(o: &Options, lines: &[String]) -> Result<(), String> {
    let mut log = lines.join("\n");
    if !log.is_empty() {
        log.push('\n');
    }
    write_atomic(&o.dir.join(format!("regs.rank{}.log", o.rank)), &log)
}

/// This rank's status, `status.rank<R>`: `ok` or `failed: ...`.
fn write_status(o: &Options, problems: &[String]) -> Result<(), String> {
    let status = if problems.is_empty() {
        "ok".to_string()
    } else {
        format!("failed: {}", problems.join("; "))
    };
    write_atomic(
        &o.dir.join(format!("status.rank{}", o.rank)),
        &format!("{status}\n"),
    )
}

/// What a clean run did, and the free device memory after each cycle.
fn print_summary(r: usize, rep: &Report, elapsed: Duration) {
    let per_comm = |c: &str| rep.lines.iter().filter(|l| l.comm == c).count();
    println!(
        "rank {r}: {} cycles in {:.2} s: {} registrations (A {}, B {}), {} all-reduces \
         checked, {} frees deregistered both windows first, {}/{} re-allocations got a \
         freed address back",
        rep.cycles.len(),
        elapsed.as_secs_f64(),
        rep.lines.len(),
        per_comm("A"),
        per_comm("B"),
        rep.all_reduces,
        rep.frees_checked,
        rep.reused,
        rep.reallocs
    );
    if rep.reused == 0 {
        println!("rank {r}: note: NCCL handed out no freed address again (not required)");
    }
    let free: Vec<String> = rep
        .cycles
        .iter()
        .filter_map(|c| c.free_device_bytes)
        .map(|b| format!("{:.0}", b as f64 / MIB))
        .collect();
    println!(
        "rank {r}: free device MiB after each cycle: {}",
        free.join(" ")
    );
}

/// The free-memory check: a problem if more than the tolerance was lost
/// from the end of the warm-up to the end.
fn check_memory(o: &Options, rep: &Report) -> Option<String> {
    let r = o.rank;
    let Some((base, end, loss)) = memory_loss(rep, o.warmup) else {
        println!("rank {r}: too few cycles for a memory baseline (--cycles > --warmup)");
        return None;
    };
    println!(
        "rank {r}: free device memory: {base:.1} MiB after warm-up cycle {}, {end:.1} MiB at \
         the end: {loss:+.1} MiB lost (allowed {:.1})",
        o.warmup, o.tolerance_mib
    );
    (loss > o.tolerance_mib).then(|| {
        format!(
            "free device memory fell by {loss:.1} MiB over {} cycles",
            rep.cycles.len() - o.warmup
        )
    })
}

/// Rank 0: waits for every other rank's status and log, and compares each
/// log with its own. Returns the problems found.
fn compare_peer_logs(
    o: &Options,
    deadline: Instant,
    lines: &[String],
    complete: bool,
) -> Result<Vec<String>, String> {
    let mut problems = Vec::new();
    for peer in 1..o.world {
        let st = wait_for_file(
            &o.dir.join(format!("status.rank{peer}")),
            deadline,
            &format!("rank {peer}'s status"),
            None,
        )?;
        if st.trim() != "ok" {
            problems.push(format!("rank {peer}: {}", st.trim()));
        }
        let text = fs::read_to_string(o.dir.join(format!("regs.rank{peer}.log")))
            .map_err(|e| format!("rank {peer}'s log: {e}"))?;
        let theirs: Vec<String> = text.lines().map(str::to_string).collect();
        match compare_logs((0, lines), (peer, &theirs)) {
            Ok(n) => println!(
                "rank 0: registration logs of ranks 0 and {peer} are identical{} \
                 ({n} registrations, same order)",
                if complete { "" } else { " as far as they go" }
            ),
            Err(e) => problems.push(format!("logs: {e}")),
        }
    }
    Ok(problems)
}

fn main() -> ExitCode {
    let o = match parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let deadline = Instant::now() + o.timeout;
    let phase = Phase(Arc::new(Mutex::new("starting".into())));
    start_watchdog(o.rank, deadline, o.timeout, phase.clone());
    if let Err(e) = fs::create_dir_all(&o.dir) {
        eprintln!("rank {}: {}: {e}", o.rank, o.dir.display());
        return ExitCode::FAILURE;
    }
    let outcome = match o.scenario {
        Some(sc) => {
            phase.set(&format!("scenario {sc:?}"));
            never_hang::run(&o, sc, deadline)
        }
        None => run(&o, &phase, deadline),
    };
    match outcome {
        Ok(()) => {
            println!("rank {}: PASS", o.rank);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rank {}: FAIL: {e}", o.rank);
            // Tell rank 0 (it may be waiting for this rank's status).
            let status = o.dir.join(format!("status.rank{}", o.rank));
            if !status.exists() {
                let _ = write_atomic(&status, &format!("failed: {}\n", e.replace('\n', " ")));
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_from_arguments() {
        let o = parse(
            [
                "--rank",
                "1",
                "--world-size",
                "2",
                "--dir",
                "/tmp/x",
                "--cycles",
                "5",
            ]
            .map(String::from),
        )
        .unwrap();
        assert_eq!((o.rank, o.world, o.cycles), (1, 2, 5));
        assert!(
            parse(["--rank", "2", "--world-size", "2", "--dir", "d"].map(String::from))
                .unwrap_err()
                .contains("rank 2 of a world of 2")
        );
        assert!(parse(["--bogus".to_string()]).is_err());
    }
}
