//! The C ABI of checked comms and deadlines, driven through the cdylib's
//! exported symbols (dlopen) on the simulated backend: a checked attach and
//! its pass, an abstain, a non-blocking comm aborted at its deadline
//! through the owner's hook (a C function), and every new answer code with
//! its words in `segreg_last_error`.
//!
//! One test function: the library keeps one process-wide allocator (the
//! name contains `c_abi_through_the_exported_symbols`, which the
//! sanitizer stage skips: an instrumented cdylib cannot be dlopened).
#![cfg(not(feature = "loom"))]

mod cdylib;

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicUsize, Ordering};

use libloading::{Library, Symbol};
use segment_registry_nccl::capi::{
    SegregAbortFn, SegregStats, SEGREG_ERR_ABORTED, SEGREG_ERR_DIVERGED, SEGREG_ERR_NOT_ATTACHED,
    SEGREG_ERR_NOT_CHECKED, SEGREG_ERR_TIMEOUT, SEGREG_OK,
};

type Init = unsafe extern "C" fn() -> c_int;
type Alloc = unsafe extern "C" fn(usize, c_int, *mut c_void) -> *mut c_void;
type CommFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type Attach = unsafe extern "C" fn(*mut c_void) -> i64;
type AttachChecked = unsafe extern "C" fn(*mut c_void, i64) -> i64;
type AttachNonBlocking =
    unsafe extern "C" fn(*mut c_void, c_int, i64, Option<SegregAbortFn>, *mut c_void) -> i64;
type RegisterStatus = unsafe extern "C" fn(*mut c_void, *mut usize) -> c_int;
type MakeComm = unsafe extern "C" fn() -> *mut c_void;
type Stats = unsafe extern "C" fn(*mut SegregStats, usize) -> c_int;
type Str = unsafe extern "C" fn() -> *const c_char;
type Count = unsafe extern "C" fn() -> i64;

const MIB: usize = 1 << 20;

/// Calls of the abort hook below.
static HOOK_CALLS: AtomicUsize = AtomicUsize::new(0);

/// The owner's abort hook: `ctx` is the library's `segreg_sim_comm_abort`.
///
/// # Safety
/// `ctx` is a `CommFn` (set so by the test).
unsafe extern "C" fn abort_through_the_owner(comm: *mut c_void, ctx: *mut c_void) -> c_int {
    HOOK_CALLS.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the test passes the address of `segreg_sim_comm_abort`, whose
    // prototype is `int f(void *)`.
    let f: CommFn = unsafe { std::mem::transmute::<*mut c_void, CommFn>(ctx) };
    // SAFETY: an opaque handle; the library refuses unknown ones.
    unsafe { f(comm) }
}

/// Looks a symbol up as the C prototype of the binding it fills.
macro_rules! sym {
    ($lib:expr, $name:literal) => {
        // SAFETY: each binding's type is the C prototype of its symbol
        // (include/segment_registry.h, checked by tests/header.rs).
        unsafe { $lib.get($name) }.unwrap()
    };
}

fn message(last_error: &Symbol<'_, Str>) -> String {
    // SAFETY: no arguments; null or a NUL-terminated string valid until this
    // thread's next call, copied at once.
    let p = unsafe { last_error() };
    assert!(!p.is_null(), "a message");
    // SAFETY: as above.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

#[test]
fn checked_c_abi_through_the_exported_symbols() {
    let path = cdylib::cdylib_path();
    // SAFETY: loading our own cdylib runs no initializers with preconditions.
    let lib = unsafe { Library::new(&path) }.unwrap();
    let init_sim: Symbol<'_, Init> = sym!(lib, b"segreg_init_sim");
    let alloc: Symbol<'_, Alloc> = sym!(lib, b"segreg_alloc");
    let attach: Symbol<'_, Attach> = sym!(lib, b"segreg_attach");
    let attach_checked: Symbol<'_, AttachChecked> = sym!(lib, b"segreg_attach_checked");
    let attach_nb: Symbol<'_, AttachNonBlocking> = sym!(lib, b"segreg_attach_nonblocking");
    let status: Symbol<'_, RegisterStatus> = sym!(lib, b"segreg_register_status");
    let register: Symbol<'_, CommFn> = sym!(lib, b"segreg_register");
    let abstain: Symbol<'_, CommFn> = sym!(lib, b"segreg_abstain");
    let detach: Symbol<'_, CommFn> = sym!(lib, b"segreg_detach");
    let create: Symbol<'_, MakeComm> = sym!(lib, b"segreg_sim_comm_create");
    let create_nb: Symbol<'_, MakeComm> = sym!(lib, b"segreg_sim_comm_create_nonblocking");
    let stall: Symbol<'_, CommFn> = sym!(lib, b"segreg_sim_stall_next_register");
    let sim_abort: Symbol<'_, CommFn> = sym!(lib, b"segreg_sim_comm_abort");
    let destroy: Symbol<'_, CommFn> = sym!(lib, b"segreg_sim_comm_destroy");
    let stats: Symbol<'_, Stats> = sym!(lib, b"segreg_stats");
    let last_error: Symbol<'_, Str> = sym!(lib, b"segreg_last_error");
    let violations: Symbol<'_, Count> = sym!(lib, b"segreg_sim_violations");

    // Safe wrappers: every call passes plain values, opaque handles (which
    // the library never dereferences and refuses when unknown), or valid
    // out-pointers.
    // SAFETY: as above.
    let init_sim = || unsafe { init_sim() };
    // SAFETY: as above.
    let alloc = || unsafe { alloc(2 * MIB, 0, null_mut()) };
    // SAFETY: as above.
    let attach = |c| unsafe { attach(c) };
    // SAFETY: as above.
    let attach_checked = |c, ms| unsafe { attach_checked(c, ms) };
    // SAFETY: as above.
    let attach_nb = |c, ms, hook, ctx| unsafe { attach_nb(c, 0, ms, hook, ctx) };
    // SAFETY: as above.
    let status_only = |c| unsafe { status(c, null_mut()) };
    // SAFETY: as above.
    let status = |c, n: &mut usize| unsafe { status(c, n) };
    // SAFETY: as above.
    let register = |c| unsafe { register(c) };
    // SAFETY: as above.
    let abstain = |c| unsafe { abstain(c) };
    // SAFETY: as above.
    let detach = |c| unsafe { detach(c) };
    // SAFETY: as above.
    let create = || unsafe { create() };
    // SAFETY: as above.
    let create_nb = || unsafe { create_nb() };
    // SAFETY: as above.
    let stall = |c| unsafe { stall(c) };
    // SAFETY: as above.
    let destroy = |c| unsafe { destroy(c) };
    // SAFETY: as above.
    let violations = || unsafe { violations() };
    // SAFETY: as above.
    let stats = |s: &mut SegregStats| unsafe { stats(s, size_of::<SegregStats>()) };

    assert_eq!(init_sim(), 0);
    let mut n = usize::MAX;

    // A checked comm (one rank: the split and the agreement meet at once).
    let comm = create();
    assert!(attach_checked(comm, 2000) > 0);
    assert_eq!(attach_checked(comm, 2000), -1, "already attached");
    assert!(!alloc().is_null());
    assert_eq!(status(comm, &mut n), SEGREG_OK);
    assert_eq!(n, 1);
    assert_eq!(register(comm), 0, "nothing pending: still agrees");
    // Abstaining: every rank (here: this one) gets Diverged at once.
    assert_eq!(abstain(comm), SEGREG_ERR_DIVERGED);
    let m = message(&last_error);
    assert!(m.contains("this rank abstained"), "{m}");
    assert_eq!(status_only(comm), SEGREG_OK);

    // An unchecked comm: abstain refuses it; unknown comms are refused.
    let plain = create();
    assert!(attach(plain) > 0);
    assert_eq!(abstain(plain), SEGREG_ERR_NOT_CHECKED);
    assert_eq!(
        status(0x1234 as *mut c_void, &mut n),
        SEGREG_ERR_NOT_ATTACHED
    );
    assert_eq!(n, 0, "zeroed on failure");

    // A non-blocking comm aborted at its deadline through the owner's
    // hook: the call answers TIMEOUT, later ones ABORTED; detach makes no
    // NCCL call.
    let nb = create_nb();
    let ctx = *sim_abort as *mut c_void;
    assert_eq!(attach_nb(nb, 50, None, ctx), -1, "a hook is required");
    assert!(message(&last_error).contains("abort hook"));
    let hook: SegregAbortFn = abort_through_the_owner;
    assert!(attach_nb(nb, 50, Some(hook), ctx) > 0);
    assert_eq!(status(nb, &mut n), SEGREG_OK, "registers the allocation");
    assert!(!alloc().is_null());
    assert_eq!(stall(nb), 0);
    assert_eq!(status(nb, &mut n), SEGREG_ERR_TIMEOUT);
    let m = message(&last_error);
    assert!(
        m.contains("ncclCommWindowRegister") && m.contains("did not complete in"),
        "{m}"
    );
    assert_eq!(HOOK_CALLS.load(Ordering::SeqCst), 1);
    assert_eq!(status(nb, &mut n), SEGREG_ERR_ABORTED);
    assert_eq!(register(nb), -1);
    assert_eq!(detach(nb), 0, "an aborted comm detaches without NCCL calls");

    let mut s = SegregStats::default();
    assert_eq!(stats(&mut s), 0);
    assert_eq!(
        (s.timeouts, s.comms_aborted, s.windows_dropped, s.diverged),
        (1, 1, 1, 1),
        "{s:?}"
    );
    assert!(s.agreements >= 4, "{s:?}");
    for c in [comm, plain] {
        assert!(detach(c) >= 0);
        assert_eq!(destroy(c), 0);
    }
    assert_eq!(violations(), 0);
}
