//! The never-hang scenarios on real ranks (`--scenario`; `NEVER_HANG.md`):
//!
//! * `diverge`: rank 1 allocates one extra segment before a checked pass:
//!   every rank gets `Diverged` at once, nothing is registered; after rank 1
//!   frees it the next pass registers on every rank. Then rank 1 skips one
//!   checked pass and calls the next: one `Diverged` on every rank, then
//!   the passes match again. Last, the unchecked control: rank 1 allocates
//!   an extra segment before an unchecked pass, so it makes one
//!   registration more than its peers; what ends it is the deadline (or
//!   NCCL's own error), and rank 0's next call on that comm too.
//! * `deadline`: rank 1 stops taking part: rank 0's checked pass ends at
//!   the deadline with `Timeout`, its comm aborted, no segment lost; rank 1
//!   then runs into its own deadlines on the comm (its pass, then its
//!   detach), which abort its side; device memory is compared once both
//!   ranks have aborted.
//! * `costs`: a checked pass with nothing pending and with one segment, an
//!   unchecked pass likewise, a bare 16-byte all-reduce and a bare
//!   all-reduce of the digest on the agreement comm, in one run, medians
//!   of `--cycles` iterations after 100 warm-up ones.
//!
//! Both comms are non-blocking and owned by the glue (so a deadline can
//! abort them): A attached checked, B unchecked, both with the deadline of
//! `--call-deadline` (default 20 s). Ranks meet, besides NCCL, through
//! files in `--dir` (`<flag>.rank<R>`), with the process's own timeout.

use std::path::Path;
use std::time::Instant;

use segment_registry_nccl::real::RealBackend;
use segment_registry_nccl::{
    Allocator, AttachOptions, Backend, BackendError, CommId, CommState, Digest, PassSummary,
    RawComm, RegisterError, Wait,
};

use super::exchange::{exchange_ids, wait_for_file, write_atomic};
use super::{pick_device, Options};

const MIB: usize = 1 << 20;

/// Which scenario `--scenario` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scenario {
    /// Divergent sets, a skipped pass, and the unchecked control.
    Diverge,
    /// A rank that stops taking part.
    Deadline,
    /// The costs of passes and all-reduces at this rank count.
    Costs,
}

impl Scenario {
    /// The scenario of a `--scenario` value.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        match s {
            "diverge" => Ok(Scenario::Diverge),
            "deadline" => Ok(Scenario::Deadline),
            "costs" => Ok(Scenario::Costs),
            other => Err(format!(
                "unknown scenario {other:?}: diverge, deadline or costs"
            )),
        }
    }
}

/// One rank's allocator and its two attached comms.
struct Job<'o> {
    o: &'o Options,
    al: Allocator<RealBackend>,
    device: i32,
    /// Comm A (checked) and comm B (unchecked), raw.
    raws: [RawComm; 2],
    a: CommId,
    b: CommId,
}

impl Job<'_> {
    fn rank(&self) -> usize {
        self.o.rank
    }

    fn say(&self, s: &str) {
        println!("rank {}: {s}", self.rank());
    }

    fn alloc(&self, size: usize) -> Result<usize, String> {
        self.al
            .alloc(size, self.device)
            .map_err(|e| format!("alloc: {e}"))
    }

    fn free(&self, ptr: usize) -> Result<(), String> {
        self.al
            .free(ptr)
            .map(drop)
            .map_err(|e| format!("free: {e}"))
    }

    /// Marks `flag` done for this rank (`<flag>.rank<R>` in the folder).
    fn mark(&self, flag: &str) -> Result<(), String> {
        write_atomic(
            &self.o.dir.join(format!("{flag}.rank{}", self.rank())),
            "done\n",
        )
    }

    /// Waits until every other rank marked `flag`.
    fn wait_marked(&self, flag: &str, deadline: Instant) -> Result<(), String> {
        for peer in (0..self.o.world).filter(|&p| p != self.rank()) {
            let path = self.o.dir.join(format!("{flag}.rank{peer}"));
            wait_for(&path, deadline, &format!("rank {peer}'s {flag}"))?;
        }
        Ok(())
    }

    fn state(&self, comm: CommId) -> Option<CommState> {
        self.al
            .stats()
            .comms
            .iter()
            .find(|c| c.comm == comm)
            .map(|c| c.state)
    }

    fn free_device_mib(&self) -> Result<f64, String> {
        self.al
            .backend()
            .mem_get_info(self.device)
            .map(|(free, _)| free as f64 / MIB as f64)
            .map_err(|e| e.to_string())
    }
}

fn wait_for(path: &Path, deadline: Instant, what: &str) -> Result<(), String> {
    wait_for_file(path, deadline, what, None).map(drop)
}

/// Makes and attaches both comms (collective: every rank at once).
fn setup<'o>(o: &'o Options, deadline: Instant) -> Result<Job<'o>, String> {
    let backend = RealBackend::new().map_err(|e| e.to_string())?;
    let device = pick_device(o, &backend)?;
    let v = backend.nccl_version();
    println!(
        "rank {}/{}: NCCL {}.{}.{}, device {device} of {}, pid {}, call deadline {:.1} s",
        o.rank,
        o.world,
        v / 10000,
        v / 100 % 100,
        v % 100,
        backend.device_count().unwrap_or(-1),
        std::process::id(),
        o.call_deadline.as_secs_f64()
    );
    let ids = exchange_ids(&o.dir, (o.rank, o.world), &backend, deadline)?;
    let wait = Wait::give_up_after(o.call_deadline);
    let (world, rank) = (o.world as i32, o.rank as i32); // checked by `parse`
    let mut raws = [RawComm(0); 2];
    for (raw, id) in raws.iter_mut().zip(&ids) {
        *raw = backend
            .comm_init_rank_nonblocking(device, world, rank, id, &wait)
            .map_err(|e| format!("non-blocking comm init: {e}"))?;
    }
    let al = Allocator::new(backend);
    let opts = AttachOptions::new().owned().deadline(o.call_deadline);
    let a = al
        .attach_with(raws[0], opts.clone().checked())
        .map_err(|e| format!("checked attach of A: {e}"))?;
    let b = al
        .attach_with(raws[1], opts)
        .map_err(|e| format!("attach of B: {e}"))?;
    println!(
        "rank {}: comm A {:?} attached checked, comm B {:?} unchecked",
        o.rank, raws[0], raws[1]
    );
    Ok(Job {
        o,
        al,
        device,
        raws,
        a,
        b,
    })
}

/// Runs `scenario` on this rank.
pub(crate) fn run(o: &Options, scenario: Scenario, deadline: Instant) -> Result<(), String> {
    let job = setup(o, deadline)?;
    match scenario {
        Scenario::Diverge => diverge(&job, deadline),
        Scenario::Deadline => lost_peer(&job, deadline),
        Scenario::Costs => costs(&job),
    }
}

/// A pass that must end in `Diverged`, promptly (well before the deadline).
fn expect_diverged(job: &Job<'_>, what: &str) -> Result<(), String> {
    let t = Instant::now();
    let r = job.al.register(job.a);
    let took = t.elapsed();
    match r {
        Err(RegisterError::Diverged(d)) if took < job.o.call_deadline / 2 => {
            job.say(&format!(
                "{what}: Diverged after {:.1} ms, as expected: {}",
                took.as_secs_f64() * 1e3,
                RegisterError::Diverged(d)
            ));
            Ok(())
        }
        other => Err(format!(
            "{what}: expected Diverged at once, got {other:?} after {took:.1?}"
        )),
    }
}

/// A pass that must register `n` segments.
fn expect_registered(job: &Job<'_>, comm: CommId, n: usize, what: &str) -> Result<(), String> {
    let s = job.al.register(comm).map_err(|e| format!("{what}: {e}"))?;
    if s.registered.len() != n {
        return Err(format!(
            "{what}: registered {:?}, expected {n}",
            s.registered
        ));
    }
    job.say(&format!("{what}: registered {n} on every rank"));
    Ok(())
}

fn diverge(job: &Job<'_>, deadline: Instant) -> Result<(), String> {
    let r = job.rank();
    // 1. An extra segment on rank 1.
    let x = job.alloc(2 * MIB)?;
    let extra = if r == 1 {
        Some(job.alloc(4 * MIB)?)
    } else {
        None
    };
    expect_diverged(job, "checked pass, rank 1 holding one extra segment")?;
    let s = job.al.stats();
    if s.windows_registered != 0 {
        return Err(format!(
            "a diverged pass registered {}",
            s.windows_registered
        ));
    }
    if let Some(e) = extra {
        job.free(e)?;
    }
    expect_registered(
        job,
        job.a,
        1,
        "the next checked pass, the extra segment freed",
    )?;

    // 2. Rank 1 skips one checked pass. Rank 0's pass meets rank 1's next
    //    one, whose set is larger: both diverge; then the counts and sets
    //    match again.
    let y = job.alloc(2 * MIB)?;
    let z;
    if r == 1 {
        job.say("skipping one checked pass");
        z = job.alloc(6 * MIB)?;
        expect_diverged(job, "the pass after the skipped one")?;
        expect_registered(job, job.a, 2, "one more pass")?;
    } else {
        expect_diverged(job, "a checked pass the peer skipped")?;
        z = job.alloc(6 * MIB)?;
        expect_registered(job, job.a, 2, "the next pass")?;
    }
    let s = job.al.stats();
    job.say(&format!(
        "after the checked steps: {} diverged passes, {} agreements, {} windows",
        s.diverged, s.agreements, s.windows_registered
    ));

    // 3. The unchecked control on comm B: rank 1 makes one registration
    //    more than its peers.
    job.say("unchecked control on comm B: rank 1 allocates one extra segment");
    let aborted_before_control = job.al.stats().comms_aborted;
    let extra = if r == 1 {
        Some(job.alloc(2 * MIB)?)
    } else {
        None
    };
    let t = Instant::now();
    let pass = job.al.register(job.b);
    job.say(&format!(
        "unchecked pass on B after {:.2} s: {}",
        t.elapsed().as_secs_f64(),
        match &pass {
            Ok(s) => format!(
                "Ok, {} registered (this rank cannot tell)",
                s.registered.len()
            ),
            Err(e) => format!("{e}"),
        }
    ));
    // Its next call on B (detach's deregistrations) meets what the peer
    // left; then B is aborted, by the glue at a deadline or here.
    job.say(&format!("comm B is now {:?}", job.state(job.b)));
    abort_unless_gone(job, 1, aborted_before_control)?;
    let s = job.al.stats();
    job.say(&format!(
        "comm B gone: {} timeouts, {} comms aborted by the glue in all",
        s.timeouts, s.comms_aborted
    ));

    // Clean up comm A (collective), then every segment.
    job.mark("control-done")?;
    job.wait_marked("control-done", deadline)?;
    for p in [Some(x), Some(y), Some(z), extra].into_iter().flatten() {
        job.free(p)?;
    }
    job.al
        .detach(job.a)
        .map_err(|e| format!("detach of A: {e}"))?;
    // SAFETY: made by `setup`, detached just above, used by no other thread.
    unsafe { job.al.backend().comm_destroy(job.raws[0]) }.map_err(|e| e.to_string())?;
    check_nothing_lost(job)
}

/// Every allocation freed, every `ncclMemFree` fine.
fn check_nothing_lost(job: &Job<'_>) -> Result<(), String> {
    let s = job.al.stats();
    job.say(&format!(
        "allocs {}, frees {}, ncclMemFree {} ok / {} failed, live segments {}, windows \
         registered {}, deregistered {}, dropped {}, timeouts {}, comms aborted {}",
        s.allocs,
        s.frees,
        s.mem_frees,
        s.mem_free_failures,
        s.live_segments,
        s.windows_registered,
        s.windows_deregistered,
        s.windows_dropped,
        s.timeouts,
        s.comms_aborted
    ));
    if s.live_segments != 0 || s.mem_frees != s.allocs || s.mem_free_failures != 0 {
        return Err(format!("segments lost: {s:?}"));
    }
    Ok(())
}

/// Whether a pass's error is its deadline: a registration's (`Timeout`)
/// or the agreement's (`Agreement` from a `Timeout`).
fn at_deadline(e: &RegisterError) -> bool {
    matches!(
        e,
        RegisterError::Timeout { .. }
            | RegisterError::Agreement {
                source: BackendError::Timeout { .. },
                ..
            }
    )
}

/// Ends comm `i` (0: A, 1: B) after its peer stopped taking part: detached
/// already, it is aborted here unless the glue aborted it at a deadline
/// (`comms_aborted` grew since `aborted_before`). Never destroyed: a peer
/// that left cannot take part in its finalization.
fn abort_unless_gone(job: &Job<'_>, i: usize, aborted_before: u64) -> Result<(), String> {
    let (id, raw) = ([job.a, job.b][i], job.raws[i]);
    if job.state(id).is_some() {
        let t = Instant::now();
        let d = job.al.detach(id);
        job.say(&format!(
            "detach of comm {} after {:.2} s: {}",
            ["A", "B"][i],
            t.elapsed().as_secs_f64(),
            d.map_or_else(|e| e.to_string(), |rep| format!("{rep:?}"))
        ));
    }
    if job.state(id).is_some() {
        return Err(format!("comm {} is still attached", ["A", "B"][i]));
    }
    if job.al.stats().comms_aborted > aborted_before {
        job.say(&format!(
            "comm {} was aborted by the glue at a deadline",
            ["A", "B"][i]
        ));
    } else {
        job.al
            .backend()
            .comm_abort(raw)
            .map_err(|e| format!("ncclCommAbort: {e}"))?;
        job.say(&format!(
            "comm {} aborted by this rank (its peer cannot finalize it)",
            ["A", "B"][i]
        ));
    }
    Ok(())
}

fn lost_peer(job: &Job<'_>, deadline: Instant) -> Result<(), String> {
    let r = job.rank();
    let before = job.free_device_mib()?;
    let x = job.alloc(2 * MIB)?;
    expect_registered(job, job.a, 1, "a checked pass with both ranks")?;
    let y = job.alloc(2 * MIB)?;
    let aborted_before = job.al.stats().comms_aborted;
    if r == 0 {
        let t = Instant::now();
        match job.al.register(job.a) {
            Err(e) if at_deadline(&e) => job.say(&format!(
                "the pass ended at the deadline after {:.2} s: {e}",
                t.elapsed().as_secs_f64()
            )),
            other => return Err(format!("expected the deadline, got {other:?}")),
        }
        job.say(&format!("comm A is now {:?}", job.state(job.a)));
        abort_unless_gone(job, 0, aborted_before)?;
        job.mark("timed-out")?;
    } else {
        job.say("not taking part in the next pass");
        job.wait_marked("timed-out", deadline)?;
        // The peer aborted: this rank's next call on A meets nobody.
        let t = Instant::now();
        match job.al.register(job.a) {
            Err(e) => job.say(&format!(
                "its own pass after the peer aborted ended after {:.2} s: {e}",
                t.elapsed().as_secs_f64()
            )),
            Ok(s) => return Err(format!("a pass with an aborted peer succeeded: {s:?}")),
        }
        abort_unless_gone(job, 0, aborted_before)?;
    }
    // No segment lost: both frees work, with no NCCL call on A.
    job.free(x)?;
    job.free(y)?;
    job.mark("aborted")?;
    job.wait_marked("aborted", deadline)?;
    let after = job.free_device_mib()?;
    job.say(&format!(
        "free device memory, both ranks aborted: {before:.1} MiB before, {after:.1} MiB after \
         ({:+.1} MiB)",
        after - before
    ));
    if before - after > job.o.tolerance_mib {
        return Err(format!(
            "free device memory fell by {:.1} MiB (allowed {:.1})",
            before - after,
            job.o.tolerance_mib
        ));
    }
    // Comm B took no part: detached and destroyed as usual.
    job.al
        .detach(job.b)
        .map_err(|e| format!("detach of B: {e}"))?;
    // SAFETY: made by `setup`, detached just above, used by no other thread.
    unsafe { job.al.backend().comm_destroy(job.raws[1]) }.map_err(|e| e.to_string())?;
    check_nothing_lost(job)
}

/// Median and mean of the samples, in microseconds.
fn summary(mut ns: Vec<u128>) -> (f64, f64) {
    ns.sort_unstable();
    let median = ns[ns.len() / 2] as f64 / 1e3;
    let mean = ns.iter().sum::<u128>() as f64 / ns.len() as f64 / 1e3;
    (median, mean)
}

fn time<T>(f: impl FnOnce() -> T) -> (T, u128) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed().as_nanos())
}

fn costs(job: &Job<'_>) -> Result<(), String> {
    let (al, a_raw) = (&job.al, job.raws[0]);
    let agreement = al
        .agreement_comm(job.a)
        .ok_or("a checked comm has an agreement comm")?;
    al.backend()
        .all_reduce_setup(a_raw)
        .map_err(|e| e.to_string())?;
    let iterations = job.o.cycles;
    let unbounded = Wait::unbounded();
    let mut t: [Vec<u128>; 6] = Default::default();
    let [c_none, u_none, bare, bare_digest, c_one, u_one] = &mut t;
    for i in 0..iterations + 100 {
        let keep = i >= 100;
        let record = |v: &mut Vec<u128>, ns| {
            if keep {
                v.push(ns);
            }
        };
        let mut digest = Digest::default().reduction_input();
        let (r, ns) = time(|| {
            al.backend()
                .all_reduce_max_u64(agreement, &mut digest, &unbounded)
        });
        r.map_err(|e| e.to_string())?;
        record(bare_digest, ns);
        let (r, ns) = time(|| al.register(job.a));
        expect_n(r, 0)?;
        record(c_none, ns);
        let (r, ns) = time(|| al.register(job.b));
        expect_n(r, 0)?;
        record(u_none, ns);
        let mut words = [7u64, 9];
        let (r, ns) = time(|| {
            al.backend()
                .all_reduce_max_u64(a_raw, &mut words, &unbounded)
        });
        r.map_err(|e| e.to_string())?;
        record(bare, ns);
        let p = job.alloc(2 * MIB)?;
        let (r, ns) = time(|| al.register(job.a));
        expect_n(r, 1)?;
        record(c_one, ns);
        let (r, ns) = time(|| al.register(job.b));
        expect_n(r, 1)?;
        record(u_one, ns);
        job.free(p)?;
    }
    let [c_none, u_none, bare, bare_digest, c_one, u_one] = t;
    let (bare_med, bare_mean) = summary(bare);
    println!(
        "rank {}: {iterations} iterations at {} ranks, after 100 warm-up ones; microseconds",
        job.rank(),
        job.o.world
    );
    println!("| call | median | mean | median / bare all-reduce |");
    println!("|---|---|---|---|");
    println!("| bare 16-byte all-reduce (max, u64) on A | {bare_med:.2} | {bare_mean:.2} | 1.00 |");
    for (name, v) in [
        (
            "bare all-reduce of the digest on A's agreement comm",
            bare_digest,
        ),
        ("checked pass, nothing pending (A)", c_none),
        ("unchecked pass, nothing pending (B)", u_none),
        ("checked pass, one 2 MiB segment (A)", c_one),
        ("unchecked pass, one 2 MiB segment (B)", u_one),
    ] {
        let (med, mean) = summary(v);
        println!("| {name} | {med:.2} | {mean:.2} | {:.2} |", med / bare_med);
    }
    al.backend().all_reduce_teardown(a_raw);
    for id in [job.a, job.b] {
        al.detach(id).map_err(|e| format!("detach: {e}"))?;
    }
    for raw in job.raws {
        // SAFETY: made by `setup`, detached just above, used by no other
        // thread, never again.
        unsafe { al.backend().comm_destroy(raw) }.map_err(|e| e.to_string())?;
    }
    check_nothing_lost(job)
}

/// A pass's result, which must have registered `n` segments.
fn expect_n(r: Result<PassSummary, RegisterError>, n: usize) -> Result<(), String> {
    match r {
        Ok(s) if s.registered.len() == n => Ok(()),
        other => Err(format!("expected {n} registered, got {other:?}")),
    }
}
