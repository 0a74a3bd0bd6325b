//! The two-rank workload, shared by `segment-registry-two-ranks` (real NCCL,
//! one process per GPU) and `tests/two_ranks_sim.rs` (simulated NCCL, one
//! thread per rank), so that CI runs the very program the GPUs run.
//!
//! Every rank runs the same program on one allocator (one pool) shared by
//! two comms, A and B, attached in that order:
//!
//! ```text
//! before cycle 1: alloc p (2 MiB), kept to the end
//! each cycle:
//!   region 1: alloc x 2 MiB, y 4 MiB, z 2 MiB, w 6 MiB
//!   end of region: pass A, then pass B (each registers p?, x, y, z, w)
//!   all-reduce: A x -> y, B z in place, A w in place   (real NCCL only)
//!   free y, z                       (each deregisters 2 windows first)
//!   region 2: alloc y2 4 MiB, z2 2 MiB (addresses of y, z come back)
//!   end of region: pass A, then pass B (each registers y2, z2 only)
//!   all-reduce: B y2 in place, A z2 -> x                  (real NCCL only)
//!   free x, w, y2, z2
//! after the last cycle: free p, detach A, detach B
//! ```
//!
//! Every registration call is logged as `(cycle, pass, comm, seq, size,
//! buffer)`; ranks that run the same program must produce identical logs.
//! The backend is wrapped in [`Traced`], which sees every NCCL call and
//! reports memory freed while a window still covers it, a duplicate
//! registration, or an unknown window. After every cycle the live counts
//! must be back to the same figures (one live segment, two windows).
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use segment_registry_nccl::{
    Allocator, Backend, BackendError, CommId, CommProgress, RawComm, Wait, Window,
};

/// One MiB.
pub(crate) const MIB: usize = 1 << 20;

/// The comms' names, in attach order.
pub(crate) const COMMS: [&str; 2] = ["A", "B"];

/// Region 1's buffers: name and size, in allocation order.
pub(crate) const REGION1: [(&str, usize); 4] = [
    ("x", 2 * MIB),
    ("y", 4 * MIB),
    ("z", 2 * MIB),
    ("w", 6 * MIB),
];

/// Region 2's buffers (sizes of y and z: their addresses come back).
pub(crate) const REGION2: [(&str, usize); 2] = [("y2", 4 * MIB), ("z2", 2 * MIB)];

/// The buffer kept over all cycles.
pub(crate) const PERSISTENT: (&str, usize) = ("p", 2 * MIB);

/// What a rank runs. Every rank of a correct job runs the same plan.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// Number of cycles.
    pub(crate) cycles: usize,
    /// Negative control: this rank allocates region 1's buffers at these
    /// two positions in swapped order (a rank whose program differs).
    pub(crate) swap: Option<(usize, usize)>,
}

/// One registration call, as the per-rank log records it. Nothing in it
/// depends on addresses, which differ between ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RegLine {
    /// Cycle (1-based; 0 is not used).
    pub(crate) cycle: usize,
    /// Pass within the cycle (1: after region 1, 2: after region 2).
    pub(crate) pass: usize,
    /// Comm name ("A" or "B").
    pub(crate) comm: &'static str,
    /// The segment's track sequence number.
    pub(crate) seq: u64,
    /// Its size in bytes.
    pub(crate) size: usize,
    /// The program's name of the buffer.
    pub(crate) buffer: &'static str,
}

impl fmt::Display for RegLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cycle={} pass={} comm={} seq={} size={} buf={}",
            self.cycle, self.pass, self.comm, self.seq, self.size, self.buffer
        )
    }
}

/// Figures after one cycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CycleStats {
    /// The cycle (1-based).
    pub(crate) cycle: usize,
    /// Tracked segments.
    pub(crate) live_segments: usize,
    /// Windows of live segments, all comms.
    pub(crate) live_windows: usize,
    /// Allocations not yet given back to `ncclMemFree`.
    pub(crate) unreturned: u64,
    /// Windows registered and not deregistered.
    pub(crate) outstanding_windows: u64,
    /// `cuMemGetInfo` free bytes (real NCCL only).
    pub(crate) free_device_bytes: Option<usize>,
}

/// What a rank's run produced.
#[derive(Clone, Debug, Default)]
pub(crate) struct Report {
    /// Every registration call, in order.
    pub(crate) lines: Vec<RegLine>,
    /// Figures after each cycle.
    pub(crate) cycles: Vec<CycleStats>,
    /// Region-2 allocations that got the address of a buffer freed just
    /// before.
    pub(crate) reused: usize,
    /// Region-2 allocations in all.
    pub(crate) reallocs: usize,
    /// Frees checked to have deregistered both windows first.
    pub(crate) frees_checked: usize,
    /// All-reduces run and checked (real NCCL only).
    pub(crate) all_reduces: usize,
}

impl Report {
    /// The log as text lines.
    pub(crate) fn log_lines(&self) -> Vec<String> {
        self.lines.iter().map(ToString::to_string).collect()
    }
}

/// Compares two ranks' registration logs: same count, same lines in the
/// same order. The error names the first difference.
pub(crate) fn compare_logs(
    (ra, a): (usize, &[String]),
    (rb, b): (usize, &[String]),
) -> Result<usize, String> {
    if let Some(i) = (0..a.len().min(b.len())).find(|&i| a[i] != b[i]) {
        return Err(format!(
            "registration {} differs: rank {ra} `{}`, rank {rb} `{}` \
             ({} and {} registrations)",
            i + 1,
            a[i],
            b[i],
            a.len(),
            b.len()
        ));
    }
    if a.len() != b.len() {
        let (longer, extra) = if a.len() > b.len() {
            (ra, &a[b.len()])
        } else {
            (rb, &b[a.len()])
        };
        return Err(format!(
            "registration counts differ: rank {ra} made {}, rank {rb} made {}; \
             rank {longer}'s first extra one: `{extra}`",
            a.len(),
            b.len()
        ));
    }
    Ok(a.len())
}

/// The data path of a real GPU: fill, all-reduce, read back.
pub(crate) trait DataPath {
    /// Copies `data` to device memory at `ptr` (the workload allocated at
    /// least `data.len()` f32 there).
    fn fill(&self, ptr: usize, data: &[f32]) -> Result<(), String>;
    /// Collective sum of `count` f32 from `src` into `dst` on `comm`, then
    /// waits for it.
    fn all_reduce(&self, comm: RawComm, src: usize, dst: usize, count: usize)
        -> Result<(), String>;
    /// Reads `n` f32 at `ptr`.
    fn read(&self, ptr: usize, n: usize) -> Result<Vec<f32>, String>;
}

/// Where a rank runs: its allocator, and what the backend can do beyond
/// the allocator's four calls.
pub(crate) trait Env {
    /// The NCCL backend.
    type B: Backend;
    /// The rank's allocator (one pool for both comms).
    fn allocator(&self) -> &Allocator<Traced<Self::B>>;
    /// This rank.
    fn rank(&self) -> usize;
    /// Ranks in the job.
    fn nranks(&self) -> usize;
    /// The device to allocate on.
    fn device(&self) -> i32;
    /// Names the buffer about to be allocated (the simulator compares
    /// buffers across ranks by it).
    fn label(&self, _buffer: &str) {}
    /// The data path, where there is one (real NCCL).
    fn data(&self) -> Option<&dyn DataPath> {
        None
    }
    /// `cuMemGetInfo` free bytes, where there is a device.
    fn free_device_bytes(&self) -> Result<Option<usize>, String> {
        Ok(None)
    }
}

/// A registration call as [`Traced`] saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RegCall {
    /// The comm.
    pub(crate) comm: RawComm,
    /// The buffer.
    pub(crate) ptr: usize,
    /// Its size.
    pub(crate) size: usize,
    /// Whether it succeeded.
    pub(crate) ok: bool,
}

#[derive(Default)]
struct TraceState {
    /// Live allocations: ptr -> size.
    allocs: HashMap<usize, usize>,
    /// Live windows by generation: (comm, ptr, size).
    windows: HashMap<u64, (RawComm, usize, usize)>,
    /// Registration calls not yet collected.
    calls: Vec<RegCall>,
    /// Rule breaches seen.
    violations: Vec<String>,
}

/// A backend wrapper that watches every call: memory freed while a window
/// covers it, duplicate registrations and unknown windows are recorded as
/// violations; registration calls are kept for the log. No lock is held
/// across a call into the wrapped backend.
pub(crate) struct Traced<B> {
    inner: B,
    state: Mutex<TraceState>,
}

impl<B: Backend> Traced<B> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: B) -> Self {
        Traced {
            inner,
            state: Mutex::new(TraceState::default()),
        }
    }

    /// The wrapped backend.
    pub(crate) fn inner(&self) -> &B {
        &self.inner
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TraceState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registration calls since the last call of this method.
    pub(crate) fn take_calls(&self) -> Vec<RegCall> {
        std::mem::take(&mut self.state().calls)
    }

    /// Violations seen so far.
    pub(crate) fn violations(&self) -> Vec<String> {
        self.state().violations.clone()
    }

    /// Live windows and allocations the wrapper knows of.
    pub(crate) fn live(&self) -> (usize, usize) {
        let s = self.state();
        (s.windows.len(), s.allocs.len())
    }
}

impl<B: Backend> Backend for Traced<B> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn mem_alloc(&self, size: usize, device: i32) -> Result<usize, BackendError> {
        let p = self.inner.mem_alloc(size, device)?;
        self.state().allocs.insert(p, size);
        Ok(p)
    }

    fn mem_free(&self, ptr: usize) -> Result<(), BackendError> {
        {
            let mut s = self.state();
            let len = s.allocs.get(&ptr).copied().unwrap_or(1);
            let mut covering: Vec<(u64, RawComm)> = s
                .windows
                .iter()
                .filter(|(_, &(_, p, l))| p < ptr + len && ptr < p + l)
                .map(|(&g, &(c, _, _))| (g, c))
                .collect();
            covering.sort_unstable();
            for (g, c) in covering {
                s.violations.push(format!(
                    "ncclMemFree({ptr:#x}) while window #{g} on {c:?} still covers it"
                ));
            }
        }
        self.inner.mem_free(ptr)?;
        self.state().allocs.remove(&ptr);
        Ok(())
    }

    fn nccl_version(&self) -> i32 {
        self.inner.nccl_version()
    }

    fn comm_window_register_within(
        &self,
        comm: RawComm,
        ptr: usize,
        size: usize,
        flags: i32,
        wait: &Wait<'_>,
    ) -> Result<Option<Window>, BackendError> {
        {
            let mut s = self.state();
            let dup = s
                .windows
                .values()
                .any(|&(c, p, l)| c == comm && p < ptr + size && ptr < p + l);
            if dup {
                s.violations.push(format!(
                    "duplicate registration of {ptr:#x} (+{size}) on {comm:?}"
                ));
            }
        }
        let r = self
            .inner
            .comm_window_register_within(comm, ptr, size, flags, wait);
        let mut s = self.state();
        s.calls.push(RegCall {
            comm,
            ptr,
            size,
            ok: r.is_ok(),
        });
        if let Ok(Some(w)) = &r {
            s.windows.insert(w.generation, (comm, ptr, size));
        }
        r
    }

    fn comm_window_deregister_within(
        &self,
        comm: RawComm,
        window: Window,
        wait: &Wait<'_>,
    ) -> Result<(), BackendError> {
        self.inner
            .comm_window_deregister_within(comm, window, wait)?;
        let mut s = self.state();
        match s.windows.remove(&window.generation) {
            Some((c, _, _)) if c == comm => {}
            Some((c, p, l)) => {
                s.violations
                    .push(format!("{window:?} of {c:?} deregistered on {comm:?}"));
                s.windows.insert(window.generation, (c, p, l));
            }
            None => s
                .violations
                .push(format!("{window:?} deregistered but not registered")),
        }
        Ok(())
    }

    // The agreement's calls pass through untraced: they register nothing.
    fn comm_split(&self, parent: RawComm, wait: &Wait<'_>) -> Result<RawComm, BackendError> {
        self.inner.comm_split(parent, wait)
    }

    fn comm_async_error(&self, comm: RawComm) -> Result<CommProgress, BackendError> {
        self.inner.comm_async_error(comm)
    }

    fn comm_abort(&self, comm: RawComm) -> Result<(), BackendError> {
        self.inner.comm_abort(comm)
    }

    fn comm_release(&self, comm: RawComm, wait: &Wait<'_>) -> Result<(), BackendError> {
        self.inner.comm_release(comm, wait)
    }

    fn all_reduce_setup(&self, comm: RawComm) -> Result<(), BackendError> {
        self.inner.all_reduce_setup(comm)
    }

    fn all_reduce_max_u64(
        &self,
        comm: RawComm,
        words: &mut [u64],
        wait: &Wait<'_>,
    ) -> Result<(), BackendError> {
        self.inner.all_reduce_max_u64(comm, words, wait)
    }

    fn all_reduce_teardown(&self, comm: RawComm) {
        self.inner.all_reduce_teardown(comm)
    }
}

/// Rank `rank`'s contribution to element `j` of a buffer (`salt` varies
/// the pattern per buffer). Small integers: f32 sums are exact.
fn pattern(rank: usize, salt: usize, j: usize) -> f32 {
    ((rank + 1) * ((j + salt) % 97 + 1)) as f32
}

/// The all-reduced value of element `j` over `nranks` ranks.
fn expected(nranks: usize, salt: usize, j: usize) -> f32 {
    (nranks * (nranks + 1) / 2 * ((j + salt) % 97 + 1)) as f32
}

/// A buffer of the program.
#[derive(Clone, Copy, Debug)]
struct Buf {
    name: &'static str,
    ptr: usize,
    size: usize,
}

impl Buf {
    fn floats(&self) -> usize {
        self.size / 4
    }
}

struct Runner<'a, E: Env> {
    env: &'a E,
    plan: &'a Plan,
    raws: [RawComm; 2],
    ids: [CommId; 2],
    report: Report,
    progress: &'a dyn Fn(&str),
}

impl<E: Env> Runner<'_, E> {
    fn al(&self) -> &Allocator<Traced<E::B>> {
        self.env.allocator()
    }

    fn alloc(&self, name: &'static str, size: usize) -> Result<Buf, String> {
        self.env.label(name);
        let ptr = self
            .al()
            .alloc(size, self.env.device())
            .map_err(|e| format!("alloc {name} ({size} bytes): {e}"))?;
        Ok(Buf { name, ptr, size })
    }

    fn free(&mut self, b: Buf) -> Result<(), String> {
        let r = self
            .al()
            .free(b.ptr)
            .map_err(|e| format!("free {}: {e}", b.name))?;
        // Single-threaded per rank: nothing is in flight, so both windows
        // (one per comm) are deregistered here, before ncclMemFree.
        if r.windows != COMMS.len() || r.deferred != 0 || r.held_by_pass {
            return Err(format!(
                "free {}: expected {} windows deregistered at once, got {r:?}",
                b.name,
                COMMS.len()
            ));
        }
        self.report.frees_checked += 1;
        Ok(())
    }

    /// Pass for A, then for B: each must register exactly `expect`, in
    /// that order, and the calls the backend saw must be those.
    fn passes(&mut self, cycle: usize, pass: usize, expect: &[Buf]) -> Result<(), String> {
        for (i, name) in COMMS.iter().enumerate() {
            (self.progress)(&format!("cycle {cycle} pass {pass} comm {name}"));
            let s = self
                .al()
                .register(self.ids[i])
                .map_err(|e| format!("cycle {cycle} pass {pass} on {name}: {e}"))?;
            let calls = self.al().backend().take_calls();
            let got: Vec<(usize, usize)> = s.registered.iter().map(|g| (g.addr, g.len)).collect();
            let want: Vec<(usize, usize)> = expect.iter().map(|b| (b.ptr, b.size)).collect();
            if got != want {
                return Err(format!(
                    "cycle {cycle} pass {pass} on {name}: registered {got:x?}, expected {want:x?}"
                ));
            }
            let seen: Vec<RegCall> = s
                .registered
                .iter()
                .map(|g| RegCall {
                    comm: self.raws[i],
                    ptr: g.addr,
                    size: g.len,
                    ok: true,
                })
                .collect();
            if calls != seen {
                return Err(format!(
                    "cycle {cycle} pass {pass} on {name}: the backend saw {calls:?}, \
                     the pass reports {seen:?}"
                ));
            }
            if s.windows + s.null_windows != s.registered.len() {
                return Err(format!("cycle {cycle} pass {pass} on {name}: {s:?}"));
            }
            for (g, b) in s.registered.iter().zip(expect) {
                self.report.lines.push(RegLine {
                    cycle,
                    pass,
                    comm: name,
                    seq: g.seq,
                    size: g.len,
                    buffer: b.name,
                });
            }
        }
        Ok(())
    }

    /// All-reduce (sum) `src` into `dst` on comm `c` and check the result.
    fn all_reduce(&mut self, c: usize, src: Buf, dst: Buf, salt: usize) -> Result<(), String> {
        let Some(d) = self.env.data() else {
            return Ok(());
        };
        let n = src.floats().min(dst.floats());
        let (rank, nranks) = (self.env.rank(), self.env.nranks());
        (self.progress)(&format!(
            "all-reduce {} -> {} on {}",
            src.name, dst.name, COMMS[c]
        ));
        let data: Vec<f32> = (0..n).map(|j| pattern(rank, salt, j)).collect();
        d.fill(src.ptr, &data)?;
        d.all_reduce(self.raws[c], src.ptr, dst.ptr, n)?;
        let out = d.read(dst.ptr, n)?;
        if let Some(j) = (0..n).find(|&j| out[j] != expected(nranks, salt, j)) {
            return Err(format!(
                "all-reduce {} -> {} on {}: element {j} is {}, expected {}",
                src.name,
                dst.name,
                COMMS[c],
                out[j],
                expected(nranks, salt, j)
            ));
        }
        self.report.all_reduces += 1;
        Ok(())
    }

    fn cycle(&mut self, cycle: usize, persistent: Option<Buf>) -> Result<(), String> {
        // Region 1.
        let mut order: Vec<usize> = (0..REGION1.len()).collect();
        if let Some((i, j)) = self.plan.swap {
            order.swap(i, j);
        }
        let mut r1 = Vec::with_capacity(REGION1.len());
        for &i in &order {
            let (name, size) = REGION1[i];
            r1.push(self.alloc(name, size)?);
        }
        // End of region: the passes register what the region allocated,
        // in allocation order (p first, in cycle 1).
        let expect: Vec<Buf> = persistent.into_iter().chain(r1.iter().copied()).collect();
        self.passes(cycle, 1, &expect)?;
        let by = |v: &[Buf], n: &str| v.iter().copied().find(|b| b.name == n);
        let get = |v: &[Buf], n: &str| by(v, n).ok_or(format!("no buffer {n}"));
        let (x, y, z, w) = (
            get(&r1, "x")?,
            get(&r1, "y")?,
            get(&r1, "z")?,
            get(&r1, "w")?,
        );
        self.all_reduce(0, x, y, cycle)?;
        self.all_reduce(1, z, z, cycle + 1)?;
        self.all_reduce(0, w, w, cycle + 2)?;
        // Free some: both windows deregistered first.
        self.free(y)?;
        self.free(z)?;
        // Region 2: same sizes; the freed addresses come back.
        let mut r2 = Vec::with_capacity(REGION2.len());
        for (name, size) in REGION2 {
            let b = self.alloc(name, size)?;
            self.report.reallocs += 1;
            if b.ptr == y.ptr || b.ptr == z.ptr {
                self.report.reused += 1;
            }
            r2.push(b);
        }
        self.passes(cycle, 2, &r2)?;
        let (y2, z2) = (get(&r2, "y2")?, get(&r2, "z2")?);
        self.all_reduce(1, y2, y2, cycle + 3)?;
        self.all_reduce(0, z2, x, cycle + 4)?;
        for b in [x, w, y2, z2] {
            self.free(b)?;
        }
        Ok(())
    }

    fn snapshot(&self, cycle: usize) -> Result<CycleStats, String> {
        let s = self.al().stats();
        Ok(CycleStats {
            cycle,
            live_segments: s.live_segments,
            live_windows: s.comms.iter().map(|c| c.windows).sum(),
            unreturned: s.allocs - s.mem_frees,
            outstanding_windows: s.windows_registered - s.windows_deregistered,
            free_device_bytes: self.env.free_device_bytes()?,
        })
    }
}

/// Runs the workload on one rank with raw comms `[A, B]` (made by the
/// caller, same order on every rank). Attaches them, runs the plan, frees
/// everything and detaches both; the caller destroys the comms. `progress`
/// is told each step (for a watchdog's message). The report comes back
/// also after a failure: it holds the registrations of the passes that
/// completed.
pub(crate) fn run<E: Env>(
    env: &E,
    raws: [RawComm; 2],
    plan: &Plan,
    progress: &dyn Fn(&str),
) -> (Report, Result<(), String>) {
    let al = env.allocator();
    let ids = match (al.attach(raws[0]), al.attach(raws[1])) {
        (Ok(a), Ok(b)) => [a, b],
        (a, b) => {
            let e = format!("attach: A {a:?}, B {b:?}");
            return (Report::default(), Err(e));
        }
    };
    let mut run = Runner {
        env,
        plan,
        raws,
        ids,
        report: Report::default(),
        progress,
    };
    let result = run.run_all();
    (run.report, result)
}

impl<E: Env> Runner<'_, E> {
    fn run_all(&mut self) -> Result<(), String> {
        let (env, plan, ids) = (self.env, self.plan, self.ids);
        let al = env.allocator();
        let (pname, psize) = PERSISTENT;
        let p = self.alloc(pname, psize)?;
        for cycle in 1..=plan.cycles {
            self.cycle(cycle, (cycle == 1).then_some(p))?;
            let st = self.snapshot(cycle)?;
            // Counts level off: after every cycle only p is live, with one
            // window per comm; everything else went back.
            let flat = (
                st.live_segments,
                st.live_windows,
                st.unreturned,
                st.outstanding_windows,
            ) == (1, COMMS.len(), 1, COMMS.len() as u64);
            if !flat {
                return Err(format!(
                    "after cycle {cycle}: counts did not level off: {st:?}"
                ));
            }
            self.report.cycles.push(st);
        }
        (self.progress)("final free and detach");
        self.free(p)?;
        for (i, name) in COMMS.iter().enumerate() {
            let d = al
                .detach(ids[i])
                .map_err(|e| format!("detach {name}: {e}"))?;
            if d.deregistered != 0 {
                return Err(format!(
                    "detach {name} found {} windows still registered",
                    d.deregistered
                ));
            }
        }
        let s = al.stats();
        if s.allocs != s.mem_frees
            || s.windows_registered != s.windows_deregistered
            || s.live_segments != 0
            || s.register_failures + s.deregister_failures + s.mem_free_failures + s.bad_frees != 0
        {
            return Err(format!(
                "final figures: {s:?} (last async error: {:?})",
                al.last_async_error()
            ));
        }
        let v = al.backend().violations();
        if !v.is_empty() {
            return Err(format!("backend rule violations: {v:#?}"));
        }
        if al.backend().live() != (0, 0) {
            return Err(format!(
                "backend still holds (windows, allocations) {:?}",
                al.backend().live()
            ));
        }
        Ok(())
    }
}
