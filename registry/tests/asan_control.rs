//! The sanitizer net catches our own bugs: a registry whose sweeper frees
//! unlinked nodes at once instead of deferring them (`free_without_defer`)
//! races a reader, and one whose untrack leaves the segment in the page map
//! (`skip_page_withdraw`) is looked up after the node was freed; for each,
//! AddressSanitizer must report `heap-use-after-free`.
//!
//! ASan aborts the whole process, so the broken workload runs in a child
//! process (this same test binary, filtered to the ignored child test) and
//! the parent asserts on its output. The pair runs only in the sanitizer
//! stage of `.ci/run`, which sets `SEGREG_ASAN=1`: without ASan the broken
//! workload would be silent undefined behaviour, so it is never started.
#![cfg(not(feature = "loom"))]

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use segment_registry::{Faults, Registry};

/// Runs the ignored test `child` in a child process and asserts that ASan
/// stopped it with `heap-use-after-free`.
fn assert_asan_catches(child: &str) {
    if std::env::var_os("SEGREG_ASAN").is_none() {
        eprintln!("not an AddressSanitizer build (SEGREG_ASAN unset): nothing to check");
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", child, "--nocapture"])
        .env("SEGREG_ASAN_CHILD", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr) + String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "the broken child {child} exited cleanly:\n{text}"
    );
    assert!(
        text.contains("heap-use-after-free"),
        "ASan did not name heap-use-after-free in {child}:\n{text}"
    );
}

#[test]
fn asan_reports_the_deliberately_broken_reclamation() {
    assert_asan_catches("broken_reclamation_child");
}

#[test]
fn asan_reports_a_page_map_slot_left_naming_a_freed_node() {
    assert_asan_catches("stale_page_map_child");
}

#[test]
#[ignore = "run only as the child of the test above, under AddressSanitizer"]
fn broken_reclamation_child() {
    assert!(std::env::var_os("SEGREG_ASAN_CHILD").is_some());
    let reg: Arc<Registry<u32, u64>> = Arc::new(Registry::with_faults(Faults {
        free_without_defer: true,
        ..Faults::NONE
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (reg, stop) = (reg.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = reg.segments_by_seq();
            }
        })
    };
    for i in 0..2_000_000usize {
        let addr = 0x1000_0000 + (i % 256) * 0x1000;
        if i >= 128 {
            let _ = reg.untrack(0x1000_0000 + ((i - 128) % 256) * 0x1000);
        }
        reg.track(addr, 0x1000).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
}

#[test]
#[ignore = "run only as the child of the test above, under AddressSanitizer"]
fn stale_page_map_child() {
    assert!(std::env::var_os("SEGREG_ASAN_CHILD").is_some());
    let reg: Registry<u32, u64> = Registry::with_faults(Faults {
        skip_page_withdraw: true,
        ..Faults::NONE
    });
    const N: usize = 20_000;
    let addr = |i: usize| 0x7f00_0000_0000 + i * (2 << 20);
    // Distinct addresses, so no later track replaces a stale slot; enough
    // churn for the sweeps and the epochs to free the early nodes.
    for i in 0..N {
        reg.track(addr(i), 2 << 20).unwrap();
        if i >= 8 {
            drop(reg.untrack(addr(i - 8)).unwrap());
        }
    }
    for i in 0..N {
        // The slot still names the freed node: ASan stops here.
        let _ = reg.find(addr(i));
    }
}
