//! Records which registry code the benchmarks were built from, so that every
//! result names it: `git rev-parse --short HEAD`, plus `+dirty` when
//! `registry/` differs from it. Read-only git calls; "unknown" without git.

use std::process::Command;

fn git(args: &[&str]) -> Option<std::process::Output> {
    Command::new("git")
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .ok()
}

fn main() {
    println!("cargo:rerun-if-changed=../registry/src");
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs/heads");
    let rev = git(&["rev-parse", "--short=12", "HEAD"])
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let dirty = git(&["status", "--porcelain", "--", "registry"])
        .filter(|o| o.status.success())
        .is_some_and(|o| !o.stdout.is_empty());
    let label = match rev {
        Some(r) if dirty => format!("{r}+dirty"),
        Some(r) => r,
        None => "unknown".into(),
    };
    println!("cargo:rustc-env=SEGREG_BENCH_REGISTRY_REV={label}");
}
