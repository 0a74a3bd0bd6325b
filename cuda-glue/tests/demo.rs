//! The demo binary runs its simulated multi-rank workload cleanly.
#![cfg(not(feature = "loom"))]

use std::process::Command;

#[test]
fn demo_sim_workload_reports_no_violations_and_no_leaks() {
    let out = Command::new(env!("CARGO_BIN_EXE_segment-registry-demo"))
        .args(["--sim", "--ranks", "3", "--iters", "40"])
        .output()
        .expect("run the demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("violations: 0"), "{text}");
    assert!(text.contains("live at end: 0"), "{text}");
    let handed_back = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("handed back by passes : "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .expect("a hand-back count");
    assert_eq!(handed_back, 3 * 40, "one segment freed during every pass");
}

#[test]
fn demo_rejects_bad_arguments() {
    let out = Command::new(env!("CARGO_BIN_EXE_segment-registry-demo"))
        .arg("--bogus")
        .output()
        .expect("run the demo");
    assert_eq!(out.status.code(), Some(2));
}
