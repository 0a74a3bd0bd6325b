//! The sanitizer net catches our own bug: a registry whose sweeper frees
//! unlinked nodes at once instead of deferring them (`free_without_defer`)
//! races a reader, and AddressSanitizer must report `heap-use-after-free`.
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

#[test]
fn asan_reports_the_deliberately_broken_reclamation() {
    if std::env::var_os("SEGREG_ASAN").is_none() {
        eprintln!("not an AddressSanitizer build (SEGREG_ASAN unset): nothing to check");
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "broken_reclamation_child",
            "--nocapture",
        ])
        .env("SEGREG_ASAN_CHILD", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr) + String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "the broken child exited cleanly:\n{text}"
    );
    assert!(
        text.contains("heap-use-after-free"),
        "ASan did not name heap-use-after-free:\n{text}"
    );
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
