//! One allocator state per process.
//!
//! The C entry points can live in two libraries loaded at once: the
//! standalone `libsegment_registry_nccl.so` and the Python extension (which
//! expands [`export_c_abi!`](crate::export_c_abi) itself). Each carries its
//! own statics, so two process-wide allocators would run side by side,
//! each blind to the other's segments: PyTorch's pool would allocate
//! through one while Python registers through the other. A flag inside one
//! copy cannot see the other, so each copy exports a probe
//! ([`STATE_PROBE_SYMBOL`]) answering the address of its own claim flag,
//! and at initialization walks the loaded objects (`dl_iterate_phdr`),
//! asking every other copy's probe whether it has claimed the process.
//!
//! The claim is Dekker's: a copy raises its own flag, then reads every
//! other copy's (all `SeqCst`), so of two copies initializing at once at
//! least one sees the other and refuses (both may refuse: then both report
//! the clash, which is the user's to fix either way).

use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};

/// This copy's claim on the process: raised at initialization, kept while
/// the process-wide allocator exists (for ever, once made).
static CLAIMED: AtomicBool = AtomicBool::new(false);

/// The symbol by which a copy's probe is found: exported by every library
/// that expands [`export_c_abi!`](crate::export_c_abi). Not part of the C
/// header (it is no API: its answer is only meaningful to another copy).
pub const STATE_PROBE_SYMBOL: &CStr = c"segment_registry_state_probe";

/// The probe's answer: the address of this copy's claim flag (an
/// `AtomicBool`).
pub fn state_probe() -> *const c_void {
    std::ptr::from_ref(&CLAIMED).cast()
}

/// Claims the process for this copy, or names the other copy that already
/// did.
pub(super) fn claim() -> Result<(), String> {
    CLAIMED.store(true, Ordering::SeqCst);
    match other_claimed_copy() {
        None => Ok(()),
        Some(other) => {
            CLAIMED.store(false, Ordering::SeqCst);
            Err(format!(
                "another copy of the segment registry already runs the process-wide allocator \
                 in this process ({other}); load only one: with PyTorch, give \
                 CUDAPluggableAllocator the file of segment_registry._native (the Python \
                 package's torch helper does), not libsegment_registry_nccl.so"
            ))
        }
    }
}

/// Gives the claim back (the initialization that took it failed).
pub(super) fn release() {
    CLAIMED.store(false, Ordering::SeqCst);
}

/// The path of a loaded object, other than this copy, whose probe says it
/// has claimed the process.
#[cfg(target_os = "linux")]
fn other_claimed_copy() -> Option<String> {
    loaded_objects()
        .into_iter()
        .find(|path| probe_says_claimed(path))
        .map(|p| p.to_string_lossy().into_owned())
}

#[cfg(not(target_os = "linux"))]
fn other_claimed_copy() -> Option<String> {
    None
}

/// The paths of the loaded shared objects (the main program, which has no
/// path, excluded).
#[cfg(target_os = "linux")]
fn loaded_objects() -> Vec<std::ffi::CString> {
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> libc::c_int {
        // SAFETY: `data` is the `Vec` passed below, alive and not otherwise
        // borrowed during the walk.
        let out = unsafe { &mut *data.cast::<Vec<std::ffi::CString>>() };
        // SAFETY: glibc passes a valid `dl_phdr_info` for the walk's
        // duration.
        let name = unsafe { (*info).dlpi_name };
        if !name.is_null() {
            // SAFETY: a NUL-terminated path owned by the loader.
            let name = unsafe { CStr::from_ptr(name) };
            if !name.is_empty() {
                out.push(name.to_owned());
            }
        }
        0
    }
    let mut out: Vec<std::ffi::CString> = Vec::new();
    // SAFETY: `visit` matches the callback type and only reads `info`
    // during the call; `out` outlives the walk.
    unsafe { libc::dl_iterate_phdr(Some(visit), std::ptr::from_mut(&mut out).cast()) };
    out
}

/// Whether the object at `path` exports a probe that is not this copy's
/// and whose flag is raised. The object is only looked up
/// (`RTLD_NOLOAD`), never loaded.
#[cfg(target_os = "linux")]
fn probe_says_claimed(path: &CStr) -> bool {
    // SAFETY: RTLD_NOLOAD only returns a handle to an object already
    // loaded (bumping its count, given back below); a valid C string.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_LAZY) };
    if handle.is_null() {
        return false;
    }
    // SAFETY: a live handle and a valid C string.
    let sym = unsafe { libc::dlsym(handle, STATE_PROBE_SYMBOL.as_ptr()) };
    let claimed = !sym.is_null() && {
        // SAFETY: the symbol of that name is a copy's `state_probe` entry
        // point (`export_c_abi!` defines it with this signature).
        let probe: extern "C" fn() -> *const c_void = unsafe { std::mem::transmute(sym) };
        let flag = probe();
        flag != state_probe() && {
            // SAFETY: another copy's static `AtomicBool`, alive while its
            // object is loaded, which the handle guarantees.
            let flag = unsafe { &*flag.cast::<AtomicBool>() };
            flag.load(Ordering::SeqCst)
        }
    };
    // SAFETY: gives back the count taken by the dlopen above.
    unsafe { libc::dlclose(handle) };
    claimed
}
