//! Two copies of the C entry points in one process (the standalone cdylib
//! and the Python extension, say) must not run two process-wide
//! allocators side by side: the second copy's initialization is refused,
//! naming the first, and the first goes on working.
//!
//! Skipped under AddressSanitizer (`SEGREG_ASAN=1`), like the other tests
//! that dlopen the cdylib.
#![cfg(not(feature = "loom"))]

mod cdylib;

use std::ffi::{c_char, c_int, CStr};
use std::path::Path;

type Init = unsafe extern "C" fn() -> c_int;
type LastError = unsafe extern "C" fn() -> *const c_char;

#[test]
fn a_second_copy_of_the_library_refuses_to_initialize_and_names_the_first() {
    if std::env::var("SEGREG_ASAN").is_ok_and(|v| v == "1") {
        println!("skipped under ASan: the instrumented cdylib is not dlopened");
        return;
    }
    let first = cdylib::cdylib_path();
    // A second file, so that the loader maps a second copy with its own
    // statics (the same path would give back the same object).
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("one-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let second = dir.join("libsegment_registry_copy.so");
    std::fs::copy(&first, &second).unwrap();

    // SAFETY: our own cdylib, whose initializers are Rust statics only.
    let a = unsafe { libloading::Library::new(&first) }.unwrap();
    // SAFETY: as above (a byte copy of it).
    let b = unsafe { libloading::Library::new(&second) }.unwrap();
    // SAFETY: the header's signatures, for each lookup below.
    let init_a = *unsafe { a.get::<Init>(b"segreg_init_sim") }.unwrap();
    // SAFETY: as above.
    let init_b = *unsafe { b.get::<Init>(b"segreg_init_sim") }.unwrap();
    // SAFETY: as above.
    let last_b = *unsafe { b.get::<LastError>(b"segreg_last_error") }.unwrap();
    // SAFETY: C entry points without arguments.
    assert_eq!(unsafe { init_a() }, 0, "the first copy initializes");
    // SAFETY: as above.
    assert_eq!(unsafe { init_b() }, -1, "the second copy is refused");
    // SAFETY: a C entry point without arguments.
    let last = unsafe { last_b() };
    assert!(!last.is_null(), "a refusal leaves a message");
    // SAFETY: the thread's last error, valid until its next call.
    let msg = unsafe { CStr::from_ptr(last) }
        .to_string_lossy()
        .into_owned();
    let name = first.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        msg.contains("another copy") && msg.contains(&name),
        "the refusal names the first copy: {msg}"
    );
    // SAFETY: as above.
    assert_eq!(unsafe { init_a() }, 0, "the first copy still answers");
}
