//! Helpers shared by the allocator tests.
#![allow(dead_code, unreachable_pub)]

pub mod ranks;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use segment_registry_nccl::sim::{SimBackend, SimCall, SimOp, SimWorld, TraceEvent};
use segment_registry_nccl::{Allocator, CommId, RawComm, Window};

pub const MIB: usize = 1 << 20;

/// A simulated job: one allocator (pool) per rank, comms over all ranks.
pub struct Job {
    pub world: Arc<SimWorld>,
    pub ranks: Vec<Allocator<SimBackend>>,
    /// Per comm, the raw handle of each rank.
    pub raws: Vec<Vec<RawComm>>,
    /// Per comm, the id each rank's allocator gave it.
    pub ids: Vec<Vec<CommId>>,
}

impl Job {
    pub fn new(nranks: usize, ncomms: usize) -> Job {
        let world = SimWorld::new(nranks);
        let ranks: Vec<_> = (0..nranks)
            .map(|r| Allocator::new(world.rank(r).unwrap()))
            .collect();
        let all: Vec<usize> = (0..nranks).collect();
        let mut raws = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..ncomms {
            let c = world.comm_create(&all).unwrap();
            ids.push(
                ranks
                    .iter()
                    .zip(&c)
                    .map(|(a, &raw)| a.attach(raw).unwrap())
                    .collect(),
            );
            raws.push(c);
        }
        Job {
            world,
            ranks,
            raws,
            ids,
        }
    }

    /// Detaches and destroys every comm, then checks the world is clean.
    pub fn finish(self) {
        for (c, raws) in self.raws.iter().enumerate() {
            for (r, a) in self.ranks.iter().enumerate() {
                a.detach(self.ids[c][r]).unwrap();
                self.world.comm_destroy(raws[r]).unwrap();
            }
        }
        assert_clean(&self.world);
    }
}

/// No violation, no live window, every window issued was deregistered (or
/// freed by its comm's abort).
pub fn assert_clean(world: &SimWorld) {
    let v = world.verify();
    assert!(v.is_empty(), "violations: {v:#?}");
    let s = world.stats();
    assert_eq!(s.live_windows, 0, "{s:?}");
    assert_eq!(
        s.windows_issued,
        s.windows_deregistered + s.windows_aborted,
        "{s:?}"
    );
    assert_deregistered_before_free(&world.trace());
}

/// In the trace, every window over an allocation is deregistered (or freed
/// by its comm's abort) before that allocation's ncclMemFree.
pub fn assert_deregistered_before_free(trace: &[TraceEvent]) {
    // (rank, raw, generation) -> (comm, ptr), for live windows.
    let mut live: HashMap<(usize, usize, u64), (RawComm, usize)> = HashMap::new();
    for (i, e) in trace.iter().enumerate() {
        match (e.op, e.window) {
            (SimOp::Register, Some(w)) if e.ok => {
                live.insert((e.rank, w.raw, w.generation), (e.comm, e.ptr));
            }
            (SimOp::Deregister, Some(w)) if e.ok => {
                live.remove(&(e.rank, w.raw, w.generation));
            }
            (SimOp::Abort, _) if e.ok => {
                live.retain(|k, (c, _)| !(k.0 == e.rank && *c == e.comm));
            }
            (SimOp::MemFree, _) if e.ok => {
                let under: Vec<_> = live
                    .iter()
                    .filter(|(k, &(_, p))| k.0 == e.rank && p == e.ptr)
                    .collect();
                assert!(under.is_empty(), "event {i}: {e:?} frees under {under:?}");
            }
            _ => {}
        }
    }
}

/// Index in the trace of the first event matching `f`.
pub fn position(trace: &[TraceEvent], f: impl Fn(&TraceEvent) -> bool) -> usize {
    trace
        .iter()
        .position(f)
        .unwrap_or_else(|| panic!("no such event in {trace:#?}"))
}

/// The window a successful register of `ptr` on `rank` returned.
pub fn window_of(trace: &[TraceEvent], rank: usize, ptr: usize) -> Window {
    trace
        .iter()
        .find(|e| e.rank == rank && e.op == SimOp::Register && e.ptr == ptr && e.ok)
        .and_then(|e| e.window)
        .unwrap_or_else(|| panic!("no window for {ptr:#x}"))
}

/// A registration parked inside the simulated NCCL call by a hook.
pub struct Park {
    entered: Arc<Barrier>,
    release: Arc<Barrier>,
    state: std::sync::Mutex<(bool, bool)>, // (entered, released)
}

impl Park {
    /// Waits until the parked call is in flight.
    pub fn entered(&self) {
        self.entered.wait();
        self.state.lock().unwrap().0 = true;
    }

    /// Lets the parked call go on.
    pub fn release(&self) {
        self.state.lock().unwrap().1 = true;
        self.release.wait();
    }

    /// A guard that, if the test panics before `release`, unparks the
    /// call (so a failing test fails instead of hanging on the barrier).
    /// Keep it inside the `thread::scope` closure.
    pub fn unpark_on_panic(&self) -> Unpark<'_> {
        Unpark(self)
    }
}

/// See [`Park::unpark_on_panic`].
pub struct Unpark<'a>(&'a Park);

impl Drop for Unpark<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let (entered, released) = *self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        if !entered {
            self.0.entered.wait();
        }
        if !released {
            self.0.release.wait();
        }
    }
}

/// Parks the register of `ptr` on `rank` (once) until the test releases it.
pub fn park_register(world: &SimWorld, rank: usize, ptr: usize) -> Park {
    let entered = Arc::new(Barrier::new(2));
    let release = Arc::new(Barrier::new(2));
    let (e, r) = (entered.clone(), release.clone());
    let armed = AtomicBool::new(true);
    world.set_hook(Some(Arc::new(move |call: &SimCall| {
        if call.op == SimOp::Register
            && call.rank == rank
            && call.ptr == ptr
            && armed.swap(false, Ordering::SeqCst)
        {
            e.wait();
            r.wait();
        }
    })));
    Park {
        entered,
        release,
        state: std::sync::Mutex::new((false, false)),
    }
}
