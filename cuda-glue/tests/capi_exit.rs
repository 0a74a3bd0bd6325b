//! C ABI calls made after the calling thread's thread-locals are gone: a
//! `segreg_free` (and the other calls) from an `atexit` handler and from a
//! pthread-key destructor, where PyTorch frees its pools at interpreter
//! exit. Each runs `cdylib/exit_calls.c`, compiled with `cc`, in a child
//! process that dlopens the cdylib; the child must exit 0, not abort.
//!
//! Skipped under AddressSanitizer (`SEGREG_ASAN=1`): the instrumented
//! cdylib cannot find the ASan runtime from an uninstrumented C program.
#![cfg(not(feature = "loom"))]

mod cdylib;

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cdylib/exit_calls.c");
const INCLUDE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/include");

fn under_asan() -> bool {
    std::env::var("SEGREG_ASAN").is_ok_and(|v| v == "1")
}

/// Compiles `exit_calls.c` into a folder of its own for `mode`.
fn compile(mode: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("exit-calls-{mode}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("exit_calls");
    let out = Command::new("cc")
        .args([
            "-std=gnu11",
            "-O1",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-I",
            INCLUDE,
            "-o",
        ])
        .arg(&exe)
        .arg(SOURCE)
        .args(["-ldl", "-lpthread"])
        .output()
        .expect("run cc (a C compiler is needed for this test)");
    assert!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs the program in `mode` and expects exit status 0.
fn check(mode: &str) {
    if under_asan() {
        println!("skipped under ASan: an uninstrumented C program loads the cdylib");
        return;
    }
    let exe = compile(mode);
    let out = Command::new(&exe)
        .arg(cdylib::cdylib_path())
        .arg(mode)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit_calls {mode}: {}\n{stderr}",
        out.status
    );
    assert!(stderr.contains("every call answered"), "{stderr}");
    let _ = std::fs::remove_dir_all(exe.parent().unwrap());
}

#[test]
fn calls_from_an_atexit_handler_answer_and_do_not_abort() {
    check("atexit");
}

#[test]
fn calls_from_a_pthread_key_destructor_answer_and_do_not_abort() {
    check("key-destructor");
}
