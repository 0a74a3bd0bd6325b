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
//! Exit status: 0 pass, 1 failure, 2 usage, 124 timeout. Launch both ranks
//! with `multi-gpu/run-two-ranks.sh`.

#[path = "two_ranks/workload.rs"]
mod workload;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use segment_registry_nccl::real::{RealBackend, UniqueId};
use segment_registry_nccl::{Allocator, RawComm};
use workload::{compare_logs, DataPath, Env, Plan, Report, Traced, COMMS};

const MIB: f64 = 1048576.0;
const ID_FILE: &str = "nccl-unique-ids";
const ID_MAGIC: &str = "segment-registry-two-ranks nccl ids v1";
const POLL: Duration = Duration::from_millis(50);

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
}

const USAGE: &str = "usage: segment-registry-two-ranks --dir DIR [--rank R] [--world-size N] \
[--device D] [--cycles N] [--warmup N] [--timeout SECONDS] [--tolerance-mib M] \
[--control-swap]\n\
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

/// Writes `text` to `path` atomically (a temporary file, then a rename):
/// a reader polling for `path` never sees it half written.
fn write_atomic(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    fs::write(&tmp, text).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("renaming to {}: {e}", path.display()))
}

/// Polls for `path` until `deadline`; gives up early if the rank that
/// should write it reports a failure in `peer_status`.
fn wait_for_file(
    path: &Path,
    deadline: Instant,
    what: &str,
    peer_status: Option<&Path>,
) -> Result<String, String> {
    loop {
        match fs::read_to_string(path) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        }
        if let Some(st) = peer_status.and_then(|p| fs::read_to_string(p).ok()) {
            if st.starts_with("failed") {
                return Err(format!("gave up waiting for {what}: {}", st.trim()));
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out waiting for {what} ({})", path.display()));
        }
        thread::sleep(POLL);
    }
}

/// The id file: magic, world size, one hex id per comm.
fn format_ids(world: usize, ids: &[UniqueId]) -> String {
    let mut s = format!("{ID_MAGIC}\nworld_size={world}\n");
    for id in ids {
        s.push_str(&id.to_hex());
        s.push('\n');
    }
    s
}

fn parse_ids(text: &str, world: usize, count: usize) -> Result<Vec<UniqueId>, String> {
    let mut lines = text.lines();
    if lines.next() != Some(ID_MAGIC) {
        return Err("the id file does not start with the expected header".into());
    }
    let w = lines.next().unwrap_or_default();
    if w != format!("world_size={world}") {
        return Err(format!(
            "the id file is for another job ({w:?}, this one has world_size={world})"
        ));
    }
    let ids = lines
        .map(|l| UniqueId::from_hex(l).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    if ids.len() != count {
        return Err(format!(
            "the id file holds {} ids, expected {count}",
            ids.len()
        ));
    }
    Ok(ids)
}

/// Rank 0 makes one unique id per comm and publishes them; the other ranks
/// poll for them.
fn exchange_ids(o: &Options, b: &RealBackend, deadline: Instant) -> Result<Vec<UniqueId>, String> {
    let path = o.dir.join(ID_FILE);
    if o.rank == 0 {
        if path.exists() {
            return Err(format!(
                "{} exists: a stale id from an earlier run; use a fresh --dir",
                path.display()
            ));
        }
        let ids = (0..COMMS.len())
            .map(|_| b.unique_id())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        write_atomic(&path, &format_ids(o.world, &ids))?;
        Ok(ids)
    } else {
        let text = wait_for_file(
            &path,
            deadline,
            "rank 0's NCCL unique ids",
            Some(&o.dir.join("status.rank0")),
        )?;
        parse_ids(&text, o.world, COMMS.len())
    }
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
    let r = o.rank;
    let say = |s: &str| phase.set(s);
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
    let ids = exchange_ids(o, &backend, deadline)?;
    let mut raws = [RawComm(0); 2];
    for (i, id) in ids.iter().enumerate() {
        say(&format!("ncclCommInitRank for comm {}", COMMS[i]));
        // World size fits i32 (checked by `parse`); rank < world.
        let c = backend
            .comm_init_rank(device, o.world as i32, r as i32, id)
            .map_err(|e| format!("comm {}: {e}", COMMS[i]))?;
        // SAFETY: `c` was just made by this process and is live.
        let info = unsafe { backend.comm_rank_info(c) }.map_err(|e| e.to_string())?;
        if info != (o.world as i32, r as i32) {
            return Err(format!(
                "comm {}: NCCL says (count, rank) = {info:?}",
                COMMS[i]
            ));
        }
        raws[i] = c;
    }
    println!("rank {r}: comms A {:?} and B {:?} ready", raws[0], raws[1]);
    let env = RealEnv {
        al: Allocator::new(Traced::new(backend)),
        rank: r,
        world: o.world,
        device,
        comms: raws,
    };
    // Negative control: every rank but 0 allocates region 1's x and y in
    // the opposite order, so the collective registrations differ.
    let plan = Plan {
        cycles: o.cycles,
        swap: (o.control_swap && r != 0).then_some((0, 1)),
    };
    let started = Instant::now();
    let (rep, outcome) = workload::run(&env, raws, &plan, &say);
    let elapsed = started.elapsed();

    // Log and status, whatever happened (rank 0 waits for them); after a
    // failure the log holds the passes that completed.
    let report = outcome.is_ok().then_some(&rep);
    let lines = rep.log_lines();
    let mut log = lines.join("\n");
    if !log.is_empty() {
        log.push('\n');
    }
    write_atomic(&o.dir.join(format!("regs.rank{r}.log")), &log)?;
    let mut problems: Vec<String> = Vec::new();
    if let Err(e) = &outcome {
        problems.push(format!("workload: {e}"));
    }
    if let Some(rep) = report {
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
        match memory_loss(rep, o.warmup) {
            Some((base, end, loss)) => {
                println!(
                    "rank {r}: free device memory: {base:.1} MiB after warm-up cycle {}, \
                     {end:.1} MiB at the end: {loss:+.1} MiB lost (allowed {:.1})",
                    o.warmup, o.tolerance_mib
                );
                if loss > o.tolerance_mib {
                    problems.push(format!(
                        "free device memory fell by {loss:.1} MiB over {} cycles",
                        rep.cycles.len() - o.warmup
                    ));
                }
            }
            None => {
                println!("rank {r}: too few cycles for a memory baseline (--cycles > --warmup)")
            }
        }
    }
    let status = if problems.is_empty() {
        "ok".to_string()
    } else {
        format!("failed: {}", problems.join("; "))
    };
    write_atomic(
        &o.dir.join(format!("status.rank{r}")),
        &format!("{status}\n"),
    )?;

    // Rank 0 compares the logs.
    if r == 0 {
        say("waiting for the other ranks' logs");
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
            match compare_logs((0, &lines), (peer, &theirs)) {
                Ok(n) => println!(
                    "rank 0: registration logs of ranks 0 and {peer} are identical{} \
                     ({n} registrations, same order)",
                    if outcome.is_ok() {
                        ""
                    } else {
                        " as far as they go"
                    }
                ),
                Err(e) => problems.push(format!("logs: {e}")),
            }
        }
    }

    // Destroy the comms (the workload detached them) only after a clean
    // run: after a failure a comm may still hold windows or a peer may be
    // gone; process exit cleans up.
    if outcome.is_ok() {
        say("ncclCommDestroy");
        for c in raws {
            // SAFETY: made above by this process, detached from the
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
    match run(&o, &phase, deadline) {
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
    fn id_file_round_trip_and_refusals() {
        let ids = [UniqueId([7; 128]), UniqueId([0xa5; 128])];
        let text = format_ids(2, &ids);
        assert_eq!(parse_ids(&text, 2, 2).unwrap(), ids);
        assert!(parse_ids(&text, 3, 2).unwrap_err().contains("another job"));
        assert!(parse_ids(&text, 2, 3).unwrap_err().contains("holds 2 ids"));
        assert!(parse_ids("garbage", 2, 2).is_err());
        let bad = text.replace("a5a5", "zz");
        assert!(parse_ids(&bad, 2, 2).is_err());
    }

    #[test]
    fn waiting_for_a_missing_file_times_out() {
        let dir = std::env::temp_dir().join(format!("segreg-two-ranks-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("never");
        let t = Instant::now();
        let soon = Instant::now() + Duration::from_millis(200);
        let e = wait_for_file(&p, soon, "x", None).unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        // A peer that reports a failure ends the wait at once.
        let peer = dir.join("status.peer");
        write_atomic(&peer, "failed: no GPU\n").unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        let e = wait_for_file(&p, far, "x", Some(&peer)).unwrap_err();
        assert!(e.contains("no GPU"), "{e}");
        write_atomic(&p, "hello").unwrap();
        assert_eq!(
            wait_for_file(&p, Instant::now(), "x", None).unwrap(),
            "hello"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

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
