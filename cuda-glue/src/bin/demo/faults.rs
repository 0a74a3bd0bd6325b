//! The demo's fault scenarios, on simulated ranks (one thread each, one
//! allocator each, one comm over all):
//!
//! * `--diverge`: one rank allocates one segment more than the others. The
//!   checked pass returns `Diverged` on every rank with nothing
//!   registered; the rank frees its extra segment; the next pass
//!   registers on every rank.
//! * `--stall`: the comm's registration rendezvous never completes. On a
//!   comm the glue owns (non-blocking) every rank's pass ends at the
//!   deadline with `Timeout`, the comm is aborted, its windows leave the
//!   accounting without NCCL calls, and every segment is freed once.
//!
//! Each prints what happened and returns whether everything was as
//! expected (the exit status).

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use segment_registry_nccl::sim::{set_alloc_site, SimBackend, SimOp, SimWorld};
use segment_registry_nccl::{
    Allocator, AttachOptions, CommId, CommState, RawComm, RegisterError, MEM_GRANULARITY,
};

/// The ranks of a scenario.
struct Job {
    world: Arc<SimWorld>,
    allocs: Vec<Allocator<SimBackend>>,
    raws: Vec<RawComm>,
    ids: Vec<CommId>,
}

impl Job {
    /// `ranks` ranks attaching one comm (non-blocking if `owned`) with
    /// `opts`, each on its own thread (a checked attach is collective).
    fn new(ranks: usize, owned: bool, opts: AttachOptions) -> Result<Job, String> {
        let world = SimWorld::new(ranks);
        let all: Vec<usize> = (0..ranks).collect();
        let raws = if owned {
            world.comm_create_nonblocking(&all)
        } else {
            world.comm_create(&all)
        }
        .map_err(|e| e.to_string())?;
        let allocs: Vec<_> = (0..ranks)
            .map(|r| world.rank(r).map(Allocator::new).ok_or("no such rank"))
            .collect::<Result<_, _>>()?;
        let mut job = Job {
            world,
            allocs,
            raws,
            ids: Vec::new(),
        };
        let raws = job.raws.clone();
        job.ids = job
            .each(|r, a| {
                a.attach_with(raws[r], opts.clone())
                    .map_err(|e| e.to_string())
            })
            .into_iter()
            .collect::<Result<_, _>>()?;
        Ok(job)
    }

    /// Runs `f` on every rank, one thread each; the results in rank order.
    fn each<T: Send>(&self, f: impl Fn(usize, &Allocator<SimBackend>) -> T + Sync) -> Vec<T> {
        thread::scope(|s| {
            let f = &f;
            let handles: Vec<_> = self
                .allocs
                .iter()
                .enumerate()
                .map(|(r, a)| s.spawn(move || f(r, a)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a rank thread panicked"))
                .collect()
        })
    }

    /// Frees everything, detaches and destroys (not an aborted comm: NCCL
    /// freed it), prints the accounting; whether it is exact and clean.
    fn finish(self) -> bool {
        for a in &self.allocs {
            a.free_all();
        }
        let aborted: Vec<bool> = self
            .allocs
            .iter()
            .map(|a| {
                a.stats()
                    .comms
                    .iter()
                    .any(|c| c.state == CommState::Aborted)
            })
            .collect();
        let ids = self.ids.clone();
        let detached = self.each(|r, a| a.detach(ids[r]).map_err(|e| e.to_string()));
        let mut ok = detached.iter().all(Result::is_ok);
        for (r, raw) in self.raws.iter().enumerate() {
            if !aborted[r] {
                ok &= self.world.comm_destroy(*raw).is_ok();
            }
        }
        for (r, a) in self.allocs.iter().enumerate() {
            let s = a.stats();
            let exact = s.allocs == s.mem_frees
                && s.windows_registered == s.windows_deregistered + s.windows_dropped
                && s.pending_frees == 0
                && s.orphans == 0;
            println!(
                "  rank {r}: segments {} allocated, {} freed; windows {} registered, {} \
                 deregistered, {} dropped with the aborted comm{}",
                s.allocs,
                s.mem_frees,
                s.windows_registered,
                s.windows_deregistered,
                s.windows_dropped,
                if exact { "" } else { "  <- NOT EXACT" }
            );
            ok &= exact;
        }
        let v = self.world.verify();
        println!("  violations: {}", v.len());
        for x in v.iter().take(10) {
            println!("    {}: {x:?}", x.kind());
        }
        ok && v.is_empty() && self.world.stats().live_windows == 0
    }
}

/// `--diverge`: see the module docs.
pub(crate) fn run_diverge(ranks: usize) -> Result<bool, String> {
    let ranks = ranks.max(2);
    let extra = 1;
    println!(
        "segment-registry-demo --diverge: {ranks} simulated ranks, one checked comm; rank \
         {extra} allocates one segment more than the others"
    );
    let opts = AttachOptions::new()
        .checked()
        .deadline(Duration::from_secs(30));
    let job = Job::new(ranks, false, opts)?;
    let ids = job.ids.clone();
    let size = 2 * MEM_GRANULARITY;
    let first = job.each(|r, a| {
        let mut mine = Vec::new();
        for _ in 0..2 {
            mine.push(a.alloc(size, 0).map_err(|e| e.to_string())?);
        }
        let mut spare = None;
        if r == extra {
            set_alloc_site(Some("extra"));
            spare = Some(a.alloc(size, 0).map_err(|e| e.to_string())?);
            set_alloc_site(None);
        }
        Ok::<_, String>((spare, a.register(ids[r])))
    });
    let mut ok = true;
    println!("first pass:");
    for (r, res) in first.iter().enumerate() {
        match res {
            Ok((_, Err(e @ RegisterError::Diverged(_)))) => println!("  rank {r}: {e}"),
            other => {
                ok = false;
                println!("  rank {r}: expected Diverged, got {other:?}");
            }
        }
    }
    let registered = job.world.stats().windows_issued;
    println!("  windows registered by the diverged pass, all ranks: {registered}");
    ok &= registered == 0;
    println!("rank {extra} frees its extra segment; every rank runs the pass again:");
    let spares: Vec<Option<usize>> = first
        .iter()
        .map(|r| r.as_ref().ok().and_then(|(s, _)| *s))
        .collect();
    let second = job.each(|r, a| {
        if let Some(p) = spares[r] {
            a.free(p).map_err(|e| e.to_string())?;
        }
        a.register(ids[r]).map_err(|e| e.to_string())
    });
    for (r, res) in second.iter().enumerate() {
        match res {
            Ok(s) if s.windows == 2 => {
                println!("  rank {r}: registered {} segments", s.registered.len())
            }
            other => {
                ok = false;
                println!("  rank {r}: expected 2 registered, got {other:?}");
            }
        }
    }
    println!("teardown:");
    Ok(job.finish() && ok)
}

/// `--stall`: see the module docs.
pub(crate) fn run_stall(ranks: usize, deadline: Duration) -> Result<bool, String> {
    let ranks = ranks.max(2);
    println!(
        "segment-registry-demo --stall: {ranks} simulated ranks, one non-blocking comm the \
         glue owns, deadline {deadline:?}; the second registration rendezvous never completes"
    );
    let opts = AttachOptions::new().checked().owned().deadline(deadline);
    let job = Job::new(ranks, true, opts)?;
    let ids = job.ids.clone();
    let size = 2 * MEM_GRANULARITY;
    let first = job.each(|r, a| {
        a.alloc(size, 0).map_err(|e| e.to_string())?;
        a.register(ids[r]).map_err(|e| e.to_string())
    });
    let mut ok = first
        .iter()
        .all(|p| p.as_ref().is_ok_and(|s| s.windows == 1));
    println!(
        "first pass: {} window(s) registered on every rank",
        if ok { 1 } else { 0 }
    );
    for &raw in &job.raws {
        job.world
            .stall_next(raw, SimOp::Register)
            .map_err(|e| e.to_string())?;
    }
    let start = Instant::now();
    let second = job.each(|r, a| {
        a.alloc(size, 0).map_err(|e| e.to_string())?;
        Ok::<_, String>(a.register(ids[r]))
    });
    let took = start.elapsed();
    println!("second pass (ended after {took:.2?}):");
    for (r, res) in second.iter().enumerate() {
        match res {
            Ok(Err(e @ RegisterError::Timeout { .. })) => println!("  rank {r}: {e}"),
            other => {
                ok = false;
                println!("  rank {r}: expected Timeout, got {other:?}");
            }
        }
    }
    for (r, a) in job.allocs.iter().enumerate() {
        let s = a.stats();
        let state = s.comms.first().map(|c| c.state);
        println!(
            "  rank {r}: comm {:?}, {} comm(s) aborted, {} window(s) dropped, handle attached: {}",
            state.unwrap_or(CommState::Active),
            s.comms_aborted,
            s.windows_dropped,
            a.comm_id(job.raws[r]).is_some()
        );
        ok &= state == Some(CommState::Aborted) && a.comm_id(job.raws[r]).is_none();
    }
    let sim = job.world.stats();
    println!(
        "  simulated NCCL: {} aborts (each rank's comm and its agreement comm), {} windows \
         freed by them",
        sim.aborts, sim.windows_aborted
    );
    println!("teardown (no NCCL call on the aborted comms; every segment freed once):");
    Ok(job.finish() && ok)
}
