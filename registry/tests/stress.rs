//! A bounded multi-threaded stress test on real threads: two threads churn
//! (track/untrack), two threads run passes for two comms, a third comm
//! never runs one. Every operation is stamped with a global clock at its
//! call and its return, and the history is checked at the end:
//!
//! * every window handed back exactly once (by untrack, a pass, forget or
//!   drain), and every untracked segment's memory freed exactly once;
//! * no segment registered twice with a comm;
//! * each pass registered every segment tracked before it began and not
//!   untracked before it ended its begin (and not registered earlier), none
//!   tracked after it began, none untracked before it began, in seq order.
#![cfg(not(feature = "loom"))]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use segment_registry::{CommId, Registry};

static CLOCK: AtomicU64 = AtomicU64::new(0);
fn now() -> u64 {
    CLOCK.fetch_add(1, Ordering::SeqCst)
}

#[derive(Default)]
struct SegLife {
    track: (u64, u64),
    untrack: Option<(u64, u64)>,
}

struct PassRec {
    comm: CommId,
    call: u64,
    /// An upper bound on the begin: the first callback, or the return.
    begin_by: u64,
    registered: Vec<u64>,
}

#[derive(Default)]
struct History {
    segs: BTreeMap<u64, SegLife>,
    passes: Vec<PassRec>,
    windows_issued: Vec<u64>,
    windows_back: Vec<u64>,
    frees: Vec<u64>,
}

#[test]
fn stress_history_keeps_every_guarantee() {
    const CHURN_OPS: usize = 20_000;
    const LIVE: usize = 40;
    let reg: Arc<Registry<u32, u64>> = Arc::new(Registry::new());
    let comms = [reg.attach(0), reg.attach(1)];
    let _idle = reg.attach(2);
    let hist = Arc::new(Mutex::new(History::default()));
    let next_window = Arc::new(AtomicU64::new(1));
    let done = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(4));

    let mut threads = Vec::new();
    for t in 0..2usize {
        let (reg, hist, done, start, ops) = (
            reg.clone(),
            hist.clone(),
            done.clone(),
            start.clone(),
            ops.clone(),
        );
        threads.push(thread::spawn(move || {
            let base = 0x1000_0000_0000 + t * 0x100_0000_0000;
            let mut live: Vec<usize> = Vec::new();
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ t as u64;
            let mut next = 0usize;
            start.wait();
            for _ in 0..CHURN_OPS {
                ops.fetch_add(1, Ordering::Relaxed);
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                if live.len() < LIVE && (live.is_empty() || rng % 2 == 0) {
                    let addr = base + next * 0x20_0000;
                    next += 1;
                    let call = now();
                    let seg = reg.track(addr, 0x20_0000).unwrap();
                    let ret = now();
                    hist.lock().unwrap().segs.entry(seg.seq).or_default().track = (call, ret);
                    live.push(addr);
                } else {
                    let addr = live.swap_remove((rng as usize / 2) % live.len());
                    let call = now();
                    let gone = reg.untrack(addr).unwrap();
                    let ret = now();
                    let mut h = hist.lock().unwrap();
                    h.segs.get_mut(&gone.segment.seq).unwrap().untrack = Some((call, ret));
                    h.windows_back.extend(gone.windows.iter().map(|&(_, w)| w));
                    // "Deregister" the windows, then free if ours is the
                    // last claim on the memory.
                    let free = gone.pass_hold.is_none_or(|hold| hold.release());
                    if free {
                        h.frees.push(gone.segment.seq);
                    }
                }
            }
            done.fetch_add(1, Ordering::SeqCst);
        }));
    }
    for (i, &comm) in comms.iter().enumerate() {
        let (reg, hist, done, start, next_window, ops) = (
            reg.clone(),
            hist.clone(),
            done.clone(),
            start.clone(),
            next_window.clone(),
            ops.clone(),
        );
        threads.push(thread::spawn(move || {
            start.wait();
            let mut n = 0u64;
            let mut last_ops = 0;
            loop {
                // One pass per 64 churn operations keeps the history small.
                while ops.load(Ordering::Relaxed) < last_ops + 64 && done.load(Ordering::SeqCst) < 2
                {
                    thread::yield_now();
                }
                last_ops = ops.load(Ordering::Relaxed);
                let finished = done.load(Ordering::SeqCst) == 2;
                let call = now();
                let mut first_cb = None;
                let mut issued = Vec::new();
                let report = reg
                    .register_pending(comm, |_, s| {
                        first_cb.get_or_insert_with(now);
                        n += 1;
                        if (n + i as u64) % 7 == 0 {
                            // A slow collective: let the churn run on.
                            thread::yield_now();
                        }
                        if n % 11 == 0 {
                            return Ok::<_, ()>(None); // registered, no window
                        }
                        let w = next_window.fetch_add(1, Ordering::SeqCst);
                        issued.push(w);
                        let _ = s;
                        Ok(Some(w))
                    })
                    .expect("pass");
                let ret = now();
                let mut h = hist.lock().unwrap();
                h.windows_issued.extend(issued);
                for back in report.handed_back {
                    h.windows_back.push(back.window);
                    if back.hold.release() {
                        h.frees.push(back.segment.seq);
                    }
                }
                h.frees.extend(report.free_now.iter().map(|s| s.seq));
                h.passes.push(PassRec {
                    comm,
                    call,
                    begin_by: first_cb.unwrap_or(ret),
                    registered: report.registered.iter().map(|s| s.seq).collect(),
                });
                if finished {
                    break;
                }
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }

    // Hand back what is left: forget every comm, then drain.
    let mut h = Arc::try_unwrap(hist).ok().unwrap().into_inner().unwrap();
    for c in reg.comms() {
        let f = reg.forget(c).unwrap();
        assert!(f.free_now.is_empty());
        for back in f.windows {
            h.windows_back.push(back.window);
            assert!(!back.hold.release());
        }
    }
    for u in reg.drain() {
        assert!(u.pass_hold.is_none());
        h.windows_back.extend(u.windows.into_iter().map(|(_, w)| w));
    }

    // Exactly-once windows.
    let mut issued = h.windows_issued.clone();
    issued.sort_unstable();
    let mut back = h.windows_back.clone();
    back.sort_unstable();
    assert_eq!(issued.len(), back.len(), "windows lost or duplicated");
    assert_eq!(issued, back, "every window handed back exactly once");

    // Every untracked segment freed exactly once.
    let untracked: BTreeSet<u64> = h
        .segs
        .iter()
        .filter(|(_, l)| l.untrack.is_some())
        .map(|(&s, _)| s)
        .collect();
    let mut frees = h.frees.clone();
    frees.sort_unstable();
    let unique: BTreeSet<u64> = frees.iter().copied().collect();
    assert_eq!(unique.len(), frees.len(), "a segment was freed twice");
    assert_eq!(unique, untracked, "every untracked segment freed once");

    // Per comm: no duplicates, seq order, and each pass's set.
    for &comm in &comms {
        let mut seen = BTreeSet::new();
        for p in h.passes.iter().filter(|p| p.comm == comm) {
            assert!(
                p.registered.windows(2).all(|w| w[0] < w[1]),
                "seq order within a pass"
            );
            let in_set: BTreeSet<u64> = p.registered.iter().copied().collect();
            for (&seq, life) in &h.segs {
                let in_pass = in_set.contains(&seq);
                let tracked_before = life.track.1 < p.call;
                let untracked_before = life.untrack.is_some_and(|u| u.1 < p.call);
                let untracked_after = life.untrack.is_none_or(|u| u.0 > p.begin_by);
                let tracked_after = life.track.0 > p.begin_by;
                // Operations that overlap the begin (call..first callback,
                // a walk of CASes with no callback) may go either way.
                if tracked_before && untracked_after && !seen.contains(&seq) {
                    assert!(
                        in_pass,
                        "{comm}: pass missed seq {seq}: track {:?} untrack {:?} pass call {} begin by {} registered {:?}",
                        life.track, life.untrack, p.call, p.begin_by, p.registered
                    );
                }
                if tracked_after || untracked_before {
                    assert!(
                        !in_pass,
                        "{comm}: pass registered seq {seq} outside its set"
                    );
                }
            }
            for &seq in &p.registered {
                assert!(seen.insert(seq), "{comm}: seq {seq} registered twice");
            }
        }
        assert!(!seen.is_empty());
    }
    assert!(h.passes.len() >= 4);
}
