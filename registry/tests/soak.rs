//! The churn soak: track/untrack cycles on two threads with a bounded live
//! set, passes for two comms interleaved (some with a callback that sleeps
//! a few milliseconds, as a blocking collective would), and a third comm
//! that never runs a pass. It samples the process's resident memory and the
//! registry's node counts, and asserts that they level off.
//!
//! CI runs 200,000 cycles. The long run:
//! `SOAK_CYCLES=10000000 cargo test --release -p segment-registry --test soak -- --nocapture`
#![cfg(not(feature = "loom"))]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use segment_registry::{Registry, SWEEP_SLACK};

const LIVE_PER_THREAD: usize = 500;

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4
}

#[test]
fn soak_memory_and_node_counts_level_off() {
    let cycles: u64 = std::env::var("SOAK_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let reg: Arc<Registry<u32, u64>> = Arc::new(Registry::new());
    let comms = [reg.attach(0), reg.attach(1)];
    let _idle = reg.attach(2); // never runs a pass
    let done_cycles = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();

    let mut passes = Vec::new();
    for (i, &comm) in comms.iter().enumerate() {
        let (reg, stop) = (reg.clone(), stop.clone());
        passes.push(thread::spawn(move || {
            let mut n = 0u64;
            let mut registered = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let slow = n % 50 == (i as u64) * 25;
                let report = match reg.register_pending(comm, |_, s| {
                    if slow {
                        slow_collective();
                    }
                    Ok::<_, ()>(Some(s.seq))
                }) {
                    Ok(r) => r,
                    Err(f) => f.report,
                };
                registered += report.registered.len() as u64;
                for h in report.handed_back {
                    let _ = h.hold.release();
                }
                thread::yield_now();
            }
            registered
        }));
    }

    let mut churn = Vec::new();
    for t in 0..2usize {
        let (reg, done_cycles) = (reg.clone(), done_cycles.clone());
        churn.push(thread::spawn(move || {
            let base = 0x2000_0000_0000 + t * 0x1000_0000_0000;
            let slot = |i: u64| base + (i as usize % (4 * LIVE_PER_THREAD)) * 0x20_0000;
            for i in 0..LIVE_PER_THREAD as u64 {
                reg.track(slot(i), 0x20_0000).unwrap();
            }
            let mut oldest = 0u64;
            let mut next = LIVE_PER_THREAD as u64;
            while done_cycles.fetch_add(1, Ordering::Relaxed) < cycles {
                let gone = reg.untrack(slot(oldest)).unwrap();
                oldest += 1;
                if let Some(h) = gone.pass_hold {
                    let _ = h.release();
                }
                reg.track(slot(next), 0x20_0000).unwrap();
                next += 1;
            }
        }));
    }

    let checkpoints: Vec<u64> = if cycles >= 10_000_000 {
        vec![1_000_000, 5_000_000, 10_000_000]
    } else {
        (1..=4).map(|k| cycles * k / 4).collect()
    };
    let live = 2 * LIVE_PER_THREAD;
    let log_bound = live + SWEEP_SLACK.max(live / 2) + 2 * 1024 + 8;
    let mut rows = Vec::new();
    for &cp in &checkpoints {
        while done_cycles.load(Ordering::Relaxed) < cp && !churn.iter().all(|h| h.is_finished()) {
            thread::sleep(Duration::from_millis(2));
        }
        let s = reg.stats();
        reg.flush();
        let n = reg.stats().nodes;
        rows.push((
            cp,
            rss_kib(),
            s.nodes.in_log,
            n.allocated - n.retired,
            n.retired - n.freed,
        ));
        assert!(
            s.nodes.in_log <= log_bound,
            "at {cp} cycles the log holds {} nodes (bound {log_bound})",
            s.nodes.in_log
        );
        assert!(
            n.allocated - n.retired <= log_bound as u64,
            "at {cp} cycles {} nodes are unretired (bound {log_bound})",
            n.allocated - n.retired
        );
    }
    for h in churn {
        h.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let registered: u64 = passes.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(registered > 0);

    println!("cycles     rss_kib  in_log  unretired  retired_not_freed");
    for (cp, rss, in_log, unretired, garbage) in &rows {
        println!("{cp:>10} {rss:>8} {in_log:>7} {unretired:>10} {garbage:>18}");
    }
    println!("{} cycles in {:?}", cycles, started.elapsed());
    // Resident memory levels off: the last sample is within 2x (plus a
    // small allowance for allocator noise) of the first.
    let (first, last) = (rows[0].1, rows[rows.len() - 1].1);
    assert!(
        last <= first * 2 + 16 * 1024,
        "resident memory grew from {first} KiB to {last} KiB"
    );
}

/// A registration callback blocked in a collective for a few milliseconds.
fn slow_collective() {
    thread::sleep(Duration::from_millis(3));
}
