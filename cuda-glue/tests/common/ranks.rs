//! Simulated ranks on threads, one allocator each, one comm over all,
//! attached on every rank's thread (a checked attach is collective), and a
//! watchdog: a run that does not return in time has every simulated call
//! released (so its threads end) and reports a hang instead of hanging.

use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use segment_registry_nccl::sim::{SimBackend, SimWorld};
use segment_registry_nccl::{Allocator, AttachOptions, CommId, CommState, RawComm, TestFaults};

use super::assert_clean;

/// How long a run waits for every rank before it calls a hang (the
/// default; a run that is expected to hang sets a shorter one).
pub const WATCHDOG: Duration = Duration::from_secs(10);

/// Simulated ranks, one allocator each, one comm over all.
pub struct Ranks {
    pub world: Arc<SimWorld>,
    pub allocs: Vec<Allocator<SimBackend>>,
    pub raws: Vec<RawComm>,
    pub ids: Vec<CommId>,
    pub watchdog: Duration,
}

impl Ranks {
    /// `n` ranks whose allocators have `faults`, attaching one blocking
    /// comm checked with `deadline`.
    pub fn new(n: usize, deadline: Duration, faults: TestFaults) -> Ranks {
        let opts = AttachOptions::new().checked().deadline(deadline);
        Ranks::with(n, false, opts, faults)
    }

    /// `n` ranks whose allocators have `faults`, attaching one comm
    /// (non-blocking if `nonblocking`) with `opts`, on every rank's thread.
    pub fn with(n: usize, nonblocking: bool, opts: AttachOptions, faults: TestFaults) -> Ranks {
        let world = SimWorld::new(n);
        let allocs: Vec<_> = (0..n)
            .map(|r| Allocator::new(world.rank(r).unwrap()).with_test_faults(faults))
            .collect();
        let all: Vec<usize> = (0..n).collect();
        let raws = if nonblocking {
            world.comm_create_nonblocking(&all).unwrap()
        } else {
            world.comm_create(&all).unwrap()
        };
        let mut ranks = Ranks {
            world,
            allocs,
            raws,
            ids: Vec::new(),
            watchdog: WATCHDOG,
        };
        let raws = ranks.raws.clone();
        let ids = ranks
            .run_raw(|r, a| a.attach_with(raws[r], opts.clone()))
            .expect("the attach returns on every rank");
        ranks.ids = ids.into_iter().map(|id| id.unwrap()).collect();
        ranks
    }

    /// Runs `f(rank, allocator)` on one thread per rank; `Err` naming the
    /// ranks that were still waiting after `watchdog` (their simulated
    /// calls are then released, so the threads end).
    pub fn run_raw<T: Send>(
        &self,
        f: impl Fn(usize, &Allocator<SimBackend>) -> T + Sync,
    ) -> Result<Vec<T>, String> {
        let (tx, rx) = mpsc::channel();
        thread::scope(|s| {
            let f = &f;
            let mut handles = Vec::new();
            for (r, a) in self.allocs.iter().enumerate() {
                let tx = tx.clone();
                handles.push(s.spawn(move || {
                    let v = f(r, a);
                    let _ = tx.send(r);
                    v
                }));
            }
            let start = Instant::now();
            let mut done = vec![false; self.allocs.len()];
            while done.iter().any(|d| !d) {
                let left = self.watchdog.saturating_sub(start.elapsed());
                match rx.recv_timeout(left) {
                    Ok(r) => done[r] = true,
                    Err(_) => break,
                }
            }
            let hung: Vec<usize> = (0..done.len()).filter(|&r| !done[r]).collect();
            if !hung.is_empty() {
                self.world.release_all();
            }
            let out: Vec<T> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            if hung.is_empty() {
                Ok(out)
            } else {
                Err(format!(
                    "ranks {hung:?} still waited after {:?}: a hang",
                    self.watchdog
                ))
            }
        })
    }

    /// [`run_raw`](Self::run_raw) with each rank's comm id.
    pub fn run<T: Send>(
        &self,
        f: impl Fn(usize, &Allocator<SimBackend>, CommId) -> T + Sync,
    ) -> Result<Vec<T>, String> {
        self.run_raw(|r, a| f(r, a, self.ids[r]))
    }

    /// Rank `r`'s private agreement comm.
    pub fn agreement(&self, r: usize) -> RawComm {
        self.allocs[r].agreement_comm(self.ids[r]).unwrap()
    }

    /// Frees everything, detaches the comm on every rank, destroys it
    /// where it was not aborted (NCCL freed an aborted one), and checks the
    /// accounting: every allocation freed once, every window registered
    /// deregistered or (aborted comm) dropped, nothing pending, no rule
    /// broken.
    pub fn finish(self) {
        for a in &self.allocs {
            a.free_all();
        }
        let aborted: Vec<bool> = self
            .allocs
            .iter()
            .zip(&self.ids)
            .map(|(a, id)| {
                a.stats()
                    .comms
                    .iter()
                    .any(|c| c.comm == *id && c.state == CommState::Aborted)
            })
            .collect();
        self.run(|_, a, id| a.detach(id).map(drop))
            .unwrap()
            .into_iter()
            .for_each(|d| d.unwrap());
        for (r, &raw) in self.raws.iter().enumerate() {
            if !aborted[r] {
                self.world.comm_destroy(raw).unwrap();
            }
        }
        for (r, a) in self.allocs.iter().enumerate() {
            assert_exact(r, a);
        }
        assert_clean(&self.world);
    }
}

/// The allocator's accounting is exact: every allocation freed once, every
/// window deregistered or dropped, nothing pending, no orphan.
pub fn assert_exact(r: usize, a: &Allocator<SimBackend>) {
    let s = a.stats();
    assert_eq!(s.allocs, s.mem_frees, "rank {r}: {s:?}");
    assert_eq!(
        s.windows_registered,
        s.windows_deregistered + s.windows_dropped,
        "rank {r}: {s:?}"
    );
    assert_eq!((s.pending_frees, s.orphans), (0, 0), "rank {r}: {s:?}");
}
