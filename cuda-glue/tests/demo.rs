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

/// Runs the demo with `args` and returns its stdout, asserting exit 0.
fn demo_ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_segment-registry-demo"))
        .args(args)
        .output()
        .expect("run the demo");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?}: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn demo_workload_attaches_checked_by_default_and_unchecked_on_request() {
    let checked = demo_ok(&["--sim", "--ranks", "2", "--iters", "5"]);
    assert!(checked.contains("2 checked comms"), "{checked}");
    let plain = demo_ok(&["--sim", "--ranks", "2", "--iters", "5", "--unchecked"]);
    assert!(plain.contains("2 unchecked comms"), "{plain}");
}

#[test]
fn demo_diverge_prints_the_typed_error_recovers_and_exits_0() {
    let text = demo_ok(&["--diverge", "--ranks", "3"]);
    assert!(
        text.contains(
            "rank 1: comm#1: the ranks disagree, so nothing was registered on any rank: this \
             rank has 3 pending segments (12 MiB); the group has 2 to 3; free or allocate so \
             every rank matches, then register again"
        ),
        "{text}"
    );
    assert!(
        text.contains("windows registered by the diverged pass, all ranks: 0"),
        "{text}"
    );
    for r in 0..3 {
        assert!(
            text.contains(&format!("rank {r}: registered 2 segments")),
            "{text}"
        );
    }
    assert!(text.contains("violations: 0"), "{text}");
    assert!(!text.contains("NOT EXACT"), "{text}");
}

#[test]
fn demo_stall_shows_the_deadline_ending_a_stuck_rendezvous_and_exits_0() {
    let text = demo_ok(&["--stall", "--ranks", "2", "--deadline-ms", "100"]);
    for r in 0..2 {
        assert!(
            text.contains(&format!(
                "rank {r}: ncclCommWindowRegister on comm#1 did not complete in"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "rank {r}: comm Aborted, 1 comm(s) aborted, 1 window(s) dropped, handle \
                 attached: false"
            )),
            "{text}"
        );
    }
    assert!(text.contains("violations: 0"), "{text}");
    assert!(!text.contains("NOT EXACT"), "{text}");
}
