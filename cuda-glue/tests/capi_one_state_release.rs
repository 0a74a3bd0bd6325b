//! A copy of the C entry points whose initialization failed gives its
//! claim on the process back, so another copy may initialize. A file of
//! its own (a process of its own): a claim made by another test in the
//! same process would refuse the second copy whatever the first did.
//!
//! Skipped under AddressSanitizer (`SEGREG_ASAN=1`), like the other tests
//! that dlopen the cdylib.
#![cfg(not(feature = "loom"))]

mod cdylib;

use std::ffi::c_int;
use std::path::Path;

type Init = unsafe extern "C" fn() -> c_int;

/// A copy whose initialization failed gives its claim back: another copy
/// may then initialize. (Needs a machine where the real backend cannot
/// start, as CI's: without a GPU `segreg_init` fails.)
#[test]
fn a_copy_whose_initialization_failed_leaves_the_process_to_another() {
    if std::env::var("SEGREG_ASAN").is_ok_and(|v| v == "1") {
        println!("skipped under ASan: the instrumented cdylib is not dlopened");
        return;
    }
    let first = cdylib::cdylib_path();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("one-state-failed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a_path, b_path) = (
        dir.join("libsegment_registry_a.so"),
        dir.join("libsegment_registry_b.so"),
    );
    std::fs::copy(&first, &a_path).unwrap();
    std::fs::copy(&first, &b_path).unwrap();
    // SAFETY: byte copies of our own cdylib, whose initializers are Rust
    // statics only.
    let a = unsafe { libloading::Library::new(&a_path) }.unwrap();
    // SAFETY: as above.
    let b = unsafe { libloading::Library::new(&b_path) }.unwrap();
    // SAFETY: the header's signatures.
    let init_real_a = *unsafe { a.get::<Init>(b"segreg_init") }.unwrap();
    // SAFETY: as above.
    let init_b = *unsafe { b.get::<Init>(b"segreg_init_sim") }.unwrap();
    // SAFETY: a C entry point without arguments.
    if unsafe { init_real_a() } == 0 {
        println!("skipped: the real backend started here (a GPU host)");
        return;
    }
    // SAFETY: a C entry point without arguments.
    let b_ok = unsafe { init_b() } == 0;
    assert!(b_ok, "the failed copy gave its claim back");
}
