//! Finding the cdylib that `cargo test` built next to the test binaries.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;

/// File name of the cdylib.
pub const LIB: &str = "libsegment_registry_nccl.so";

/// Path of the cdylib built with this test, or `SEGREG_CDYLIB` if set.
///
/// `cargo test` writes it to `target/<profile>/deps/`; `cargo build`
/// uplifts its own copy to `target/<profile>/`. Take the newest of the two,
/// so a stale uplifted copy is never tested.
pub fn cdylib_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SEGREG_CDYLIB") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir").to_path_buf();
    let profile = deps.parent().expect("profile dir").to_path_buf();
    [deps, profile]
        .into_iter()
        .map(|d| d.join(LIB))
        .filter_map(|p| {
            let t = std::fs::metadata(&p).and_then(|m| m.modified()).ok()?;
            Some((t, p))
        })
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p)
        .unwrap_or_else(|| panic!("{LIB} not found next to {}", exe.display()))
}
