//! The C ABI, driven through the cdylib's exported symbols (dlopen, as
//! PyTorch's CUDAPluggableAllocator does), on the simulated backend. Bad
//! input included: null, unknown pointer, double free, unknown comm; and
//! the window lookup `segreg_window_get`, every answer and bad input.
//!
//! One test function: the library keeps one process-wide allocator.
#![cfg(not(feature = "loom"))]

mod cdylib;

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr::null_mut;

use libloading::{Library, Symbol};
use segment_registry_nccl::capi::{
    SegregStats, SEGREG_ERR_CROSSES_END, SEGREG_ERR_INVALID, SEGREG_ERR_NOT_ATTACHED,
    SEGREG_ERR_NOT_REGISTERED, SEGREG_ERR_NOT_TRACKED, SEGREG_ERR_NO_WINDOW, SEGREG_OK,
};

type Init = unsafe extern "C" fn() -> c_int;
type Alloc = unsafe extern "C" fn(usize, c_int, *mut c_void) -> *mut c_void;
type Free = unsafe extern "C" fn(*mut c_void, usize, c_int, *mut c_void);
type CommFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type Attach = unsafe extern "C" fn(*mut c_void) -> i64;
type All = unsafe extern "C" fn() -> c_int;
type Stats = unsafe extern "C" fn(*mut SegregStats, usize) -> c_int;
type Str = unsafe extern "C" fn() -> *const c_char;
type MakeComm = unsafe extern "C" fn() -> *mut c_void;
type Count = unsafe extern "C" fn() -> i64;
type WindowGet =
    unsafe extern "C" fn(*mut c_void, *mut c_void, usize, *mut *mut c_void, *mut usize) -> c_int;

const MIB: usize = 1 << 20;

struct Api<'l> {
    init: Symbol<'l, Init>,
    init_sim: Symbol<'l, Init>,
    backend: Symbol<'l, Str>,
    alloc: Symbol<'l, Alloc>,
    free: Symbol<'l, Free>,
    attach: Symbol<'l, Attach>,
    register: Symbol<'l, CommFn>,
    register_all: Symbol<'l, All>,
    detach: Symbol<'l, CommFn>,
    stats: Symbol<'l, Stats>,
    last_error: Symbol<'l, Str>,
    comm_create: Symbol<'l, MakeComm>,
    comm_create_nosym: Symbol<'l, MakeComm>,
    window_get: Symbol<'l, WindowGet>,
    comm_destroy: Symbol<'l, CommFn>,
    violations: Symbol<'l, Count>,
}

/// Looks a symbol up as the C prototype the field it fills declares.
macro_rules! sym {
    ($lib:expr, $name:literal) => {
        // SAFETY: each field type of `Api` is the C prototype of the symbol
        // it is loaded from (include/segment_registry.h, checked against
        // src/capi/mod.rs by tests/header.rs).
        unsafe { $lib.get($name) }.unwrap()
    };
}

fn load(lib: &Library) -> Api<'_> {
    Api {
        init: sym!(lib, b"segreg_init"),
        init_sim: sym!(lib, b"segreg_init_sim"),
        backend: sym!(lib, b"segreg_backend"),
        alloc: sym!(lib, b"segreg_alloc"),
        free: sym!(lib, b"segreg_free"),
        attach: sym!(lib, b"segreg_attach"),
        register: sym!(lib, b"segreg_register"),
        register_all: sym!(lib, b"segreg_register_all"),
        detach: sym!(lib, b"segreg_detach"),
        stats: sym!(lib, b"segreg_stats"),
        last_error: sym!(lib, b"segreg_last_error"),
        comm_create: sym!(lib, b"segreg_sim_comm_create"),
        comm_create_nosym: sym!(lib, b"segreg_sim_comm_create_nosym"),
        window_get: sym!(lib, b"segreg_window_get"),
        comm_destroy: sym!(lib, b"segreg_sim_comm_destroy"),
        violations: sym!(lib, b"segreg_sim_violations"),
    }
}

/// Safe wrappers: the library takes device pointers and comm handles as
/// opaque values (it never dereferences them and refuses unknown ones), so
/// any value is a valid argument; only `segreg_stats` and
/// `segreg_window_get` write through their pointers, which the wrappers pass
/// valid or null.
impl Api<'_> {
    fn init(&self) -> c_int {
        // SAFETY: no arguments.
        unsafe { (self.init)() }
    }
    fn init_sim(&self) -> c_int {
        // SAFETY: no arguments.
        unsafe { (self.init_sim)() }
    }
    fn backend(&self) -> Option<String> {
        // SAFETY: no arguments; returns null or a static C string.
        let p = unsafe { (self.backend)() };
        // SAFETY: non-null: a static NUL-terminated string.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
    fn alloc(&self, size: usize) -> *mut c_void {
        // SAFETY: plain values; the stream is unused.
        unsafe { (self.alloc)(size, 0, null_mut()) }
    }
    fn free(&self, ptr: *mut c_void, size: usize) {
        // SAFETY: opaque pointer (see the impl's docs).
        unsafe { (self.free)(ptr, size, 0, null_mut()) }
    }
    fn attach(&self, comm: *mut c_void) -> i64 {
        // SAFETY: opaque handle.
        unsafe { (self.attach)(comm) }
    }
    fn register(&self, comm: *mut c_void) -> c_int {
        // SAFETY: opaque handle.
        unsafe { (self.register)(comm) }
    }
    fn register_all(&self) -> c_int {
        // SAFETY: no arguments.
        unsafe { (self.register_all)() }
    }
    fn detach(&self, comm: *mut c_void) -> c_int {
        // SAFETY: opaque handle.
        unsafe { (self.detach)(comm) }
    }
    fn stats_into(&self, out: Option<&mut SegregStats>, size: usize) -> c_int {
        let p = out.map_or(null_mut(), |s| s as *mut SegregStats);
        // SAFETY: `p` is null or a valid, writable `SegregStats`; a `size`
        // other than its size is refused without writing.
        unsafe { (self.stats)(p, size) }
    }
    fn comm_create(&self) -> *mut c_void {
        // SAFETY: no arguments.
        unsafe { (self.comm_create)() }
    }
    fn comm_create_nosym(&self) -> *mut c_void {
        // SAFETY: no arguments.
        unsafe { (self.comm_create_nosym)() }
    }
    /// `segreg_window_get` with the outputs given (None: null), each
    /// preset by the caller.
    fn window_get_into(
        &self,
        comm: *mut c_void,
        ptr: usize,
        size: usize,
        win: Option<&mut *mut c_void>,
        offset: Option<&mut usize>,
    ) -> c_int {
        let w = win.map_or(null_mut(), |w| w as *mut *mut c_void);
        let o = offset.map_or(null_mut(), |o| o as *mut usize);
        // SAFETY: `w` and `o` are null or valid, writable locals.
        unsafe { (self.window_get)(comm, ptr as *mut c_void, size, w, o) }
    }
    /// `segreg_window_get` → (code, window, offset), with both outputs
    /// preset to garbage so that the test sees what was written.
    fn window_get(&self, comm: *mut c_void, ptr: usize, size: usize) -> (c_int, usize, usize) {
        let (mut w, mut o) = (0xbad as *mut c_void, 0xbad_usize);
        let rc = self.window_get_into(comm, ptr, size, Some(&mut w), Some(&mut o));
        (rc, w as usize, o)
    }
    /// Expects a lookup error: `code`, outputs zeroed, a last error that
    /// contains `needle`.
    fn window_refused(
        &self,
        comm: *mut c_void,
        ptr: usize,
        size: usize,
        code: c_int,
        needle: &str,
    ) {
        assert_eq!(
            self.window_get(comm, ptr, size),
            (code, 0, 0),
            "lookup of [{ptr:#x}, +{size})"
        );
        self.expect_error(needle);
    }
    fn comm_destroy(&self, comm: *mut c_void) -> c_int {
        // SAFETY: opaque handle.
        unsafe { (self.comm_destroy)(comm) }
    }
    fn violations(&self) -> i64 {
        // SAFETY: no arguments.
        unsafe { (self.violations)() }
    }

    fn error(&self) -> Option<String> {
        // SAFETY: no arguments; returns null or a NUL-terminated string
        // valid until this thread's next call, copied at once.
        let p = unsafe { (self.last_error)() };
        // SAFETY: as above.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    fn expect_error(&self, needle: &str) {
        let e = self.error().expect("an error message");
        assert!(e.contains(needle), "{e:?} lacks {needle:?}");
    }

    fn stats(&self) -> SegregStats {
        let mut s = SegregStats::default();
        assert_eq!(self.stats_into(Some(&mut s), size_of::<SegregStats>()), 0);
        s
    }
}

#[test]
fn c_abi_through_the_exported_symbols() {
    let path = cdylib::cdylib_path();
    // SAFETY: loading our own cdylib runs no initializers with preconditions.
    let lib = unsafe { Library::new(&path) }.unwrap();
    let api = load(&lib);
    let bad = |v: usize| v as *mut c_void;

    // Before initialization: errors, not crashes.
    assert!(api.backend().is_none());
    assert!(api.alloc(MIB).is_null());
    api.expect_error("not initialized");
    let mut s = SegregStats::default();
    assert_eq!(api.stats_into(Some(&mut s), size_of::<SegregStats>()), -1);
    api.free(bad(0x1000), 0);
    api.expect_error("not initialized");
    api.window_refused(
        bad(0x5500_0000),
        0x1000,
        8,
        SEGREG_ERR_INVALID,
        "not initialized",
    );

    // The simulator's controls and a pass over every comm: -1, not 0.
    let sim_abort: Symbol<'_, CommFn> = sym!(lib, b"segreg_sim_comm_abort");
    let stall: Symbol<'_, CommFn> = sym!(lib, b"segreg_sim_stall_next_register");
    // SAFETY: an opaque handle, which the library refuses before init.
    assert_eq!(unsafe { sim_abort(bad(0x1000)) }, -1);
    // SAFETY: as above.
    assert_eq!(unsafe { stall(bad(0x1000)) }, -1);
    assert_eq!(api.violations(), -1);
    assert_eq!(api.register_all(), -1);
    api.expect_error("not initialized");

    // The real backend on a machine without CUDA/NCCL: a typed error.
    if segment_registry_nccl::real::RealBackend::new().is_err() {
        assert_eq!(api.init(), -1);
        api.expect_error("library was not found");
    }

    assert_eq!(api.init_sim(), 0);
    assert!(api.error().is_none(), "success clears the last error");
    assert_eq!(api.init_sim(), 0, "idempotent");
    assert_eq!(api.backend().as_deref(), Some("sim"));
    assert_eq!(api.init(), -1);
    api.expect_error("already initialized with the sim backend");

    // Comms: null, attach, attach twice.
    let comm = api.comm_create();
    assert!(!comm.is_null());
    assert_eq!(api.attach(null_mut()), -1);
    api.expect_error("null communicator");
    let id = api.attach(comm);
    assert!(id > 0);
    assert_eq!(api.attach(comm), -1);
    api.expect_error("already attached");

    // Allocate, register, free.
    let p = api.alloc(2 * MIB);
    let q = api.alloc(4 * MIB);
    assert!(!p.is_null() && !q.is_null() && p != q);
    assert!(api.alloc(0).is_null());
    api.expect_error("zero-byte");
    assert_eq!(api.register(comm), 2);
    assert_eq!(api.register(comm), 0);
    let s = api.stats();
    assert_eq!((s.live_segments, s.live_bytes), (2, (6 * MIB) as u64));
    assert_eq!((s.windows_registered, s.windows_live, s.passes), (2, 2, 2));
    assert_eq!((s.allocs, s.alloc_failures, s.comms_attached), (2, 1, 1));

    // Unknown comm.
    assert_eq!(api.register(bad(0x4242_0000)), -1);
    api.expect_error("not attached");
    assert_eq!(api.register(null_mut()), -1);
    assert_eq!(api.detach(bad(0x4242_0000)), -1);
    api.expect_error("not attached");

    api.free(p, 2 * MIB);
    assert!(api.error().is_none());
    let s = api.stats();
    assert_eq!((s.frees, s.windows_deregistered, s.mem_frees), (1, 1, 1));
    // Double free, unknown pointer, interior pointer, null.
    api.free(p, 2 * MIB);
    api.expect_error("not a live allocation");
    api.free(bad(0xdead_0000), 0);
    api.expect_error("not a live allocation");
    api.free(bad(q as usize + 4096), 0);
    api.expect_error("not a live allocation");
    api.free(null_mut(), 0);
    api.expect_error("null pointer");
    let s = api.stats();
    assert_eq!((s.frees, s.bad_frees, s.live_segments), (1, 4, 1));

    // Stats: bad size, null.
    let mut scratch = SegregStats::default();
    assert_eq!(api.stats_into(Some(&mut scratch), 8), -1);
    api.expect_error("does not match");
    assert_eq!(scratch, SegregStats::default(), "nothing written");
    assert_eq!(api.stats_into(None, size_of::<SegregStats>()), -1);

    // A pass over every comm; a new allocation is registered by it.
    let r = api.alloc(2 * MIB);
    assert_eq!(api.register_all(), 1);

    // Detach before destroying the comm; twice is an error.
    assert_eq!(api.detach(comm), 2);
    assert_eq!(api.detach(comm), -1);
    api.expect_error("not attached");
    assert_eq!(api.comm_destroy(comm), 0);
    assert_eq!(api.comm_destroy(comm), -1);
    api.free(q, 4 * MIB);
    api.free(r, 2 * MIB);

    // The comm address comes back; attaching it is a new comm.
    let again = api.comm_create();
    assert_eq!(again, comm);
    let id2 = api.attach(again);
    assert!(id2 > id);
    assert_eq!(api.register(again), 0, "nothing live to register");
    assert_eq!(api.detach(again), 0);
    assert_eq!(api.comm_destroy(again), 0);

    assert_eq!(api.violations(), 0);
    let s = api.stats();
    assert_eq!(
        (s.live_segments, s.pending_frees, s.windows_live),
        (0, 0, 0)
    );
    assert_eq!((s.allocs, s.frees, s.mem_frees), (3, 3, 3));
    assert_eq!((s.windows_registered, s.windows_deregistered), (3, 3));
    assert_eq!((s.comms_attached, s.sim_violations, s.orphans), (0, 0, 0));

    window_lookup(&api);

    // Last, as it breaks NCCL's rules: a comm destroyed while attached
    // with a window. A pass over every comm fails, and the simulator
    // counts the violation.
    let doomed = api.comm_create();
    assert!(api.attach(doomed) > 0);
    let p = api.alloc(2 * MIB);
    assert_eq!(api.register(doomed), 1);
    let _ = api.alloc(2 * MIB);
    assert_eq!(api.comm_destroy(doomed), 0);
    assert_eq!(api.violations(), 1);
    assert_eq!(api.register_all(), -1);
    api.expect_error("is not a live comm");
    api.free(p, 2 * MIB);
}

/// `segreg_window_get`: every answer, bad input, after free, after detach,
/// and a comm address that comes back.
fn window_lookup(api: &Api<'_>) {
    let bad = |v: usize| v as *mut c_void;
    let comm = api.comm_create();
    assert!(api.attach(comm) > 0);
    let a = api.alloc(4 * MIB) as usize;
    let b = api.alloc(2 * MIB) as usize;
    assert!(a != 0 && b != 0);

    // Allocated, not registered with the comm yet.
    api.window_refused(comm, a, 64, SEGREG_ERR_NOT_REGISTERED, "not registered");
    assert_eq!(api.register(comm), 2);

    // Found: the window and the offset of tensors carved out of a and b.
    let (rc, wa, off) = api.window_get(comm, a, 4 * MIB);
    assert_eq!((rc, off), (SEGREG_OK, 0));
    assert!(api.error().is_none(), "success clears the last error");
    assert_ne!(wa, 0);
    for (t, size) in [
        (a + 4096, 4096),
        (a + MIB + 256, 1000),
        (a + 4 * MIB - 8, 8),
    ] {
        assert_eq!(api.window_get(comm, t, size), (SEGREG_OK, wa, t - a));
    }
    assert_eq!(
        api.window_get(comm, a + 100, 0),
        (SEGREG_OK, wa, 100),
        "size 0"
    );
    let (rc, wb, off) = api.window_get(comm, b + 12_288, 64);
    assert_eq!((rc, off), (SEGREG_OK, 12_288));
    assert!(wb != 0 && wb != wa, "one window per allocation");

    // Not found: each answer has its code, outputs zeroed, a message.
    api.window_refused(
        comm,
        a + 4 * MIB - 8,
        16,
        SEGREG_ERR_CROSSES_END,
        "runs past",
    );
    api.window_refused(comm, a, usize::MAX, SEGREG_ERR_CROSSES_END, "runs past");
    api.window_refused(
        comm,
        0xdead_0000,
        8,
        SEGREG_ERR_NOT_TRACKED,
        "no live allocation",
    );
    api.window_refused(comm, 0, 8, SEGREG_ERR_NOT_TRACKED, "no live allocation");
    api.window_refused(
        bad(0x4242_0000),
        a,
        8,
        SEGREG_ERR_NOT_ATTACHED,
        "not attached",
    );
    api.window_refused(null_mut(), a, 8, SEGREG_ERR_INVALID, "null communicator");

    // Null outputs: refused; the other output is still zeroed.
    let mut o = 0xbad_usize;
    assert_eq!(
        api.window_get_into(comm, a, 8, None, Some(&mut o)),
        SEGREG_ERR_INVALID
    );
    api.expect_error("null output pointer");
    assert_eq!(o, 0);
    let mut w = 0xbad as *mut c_void;
    assert_eq!(
        api.window_get_into(comm, a, 8, Some(&mut w), None),
        SEGREG_ERR_INVALID
    );
    assert!(w.is_null());
    assert_eq!(
        api.window_get_into(comm, a, 8, None, None),
        SEGREG_ERR_INVALID
    );

    // A comm without symmetric support: registered, no window.
    let nosym = api.comm_create_nosym();
    assert!(!nosym.is_null());
    assert!(api.attach(nosym) > 0);
    api.window_refused(nosym, a, 8, SEGREG_ERR_NOT_REGISTERED, "not registered");
    assert_eq!(api.register(nosym), 2);
    api.window_refused(
        nosym,
        a + 8,
        8,
        SEGREG_ERR_NO_WINDOW,
        "no symmetric support",
    );
    assert_eq!(
        api.window_get(comm, a + 8, 8),
        (SEGREG_OK, wa, 8),
        "other comm unaffected"
    );

    // After free: the lookup fails cleanly, for every tensor of it.
    api.free(a as *mut c_void, 4 * MIB);
    assert!(api.error().is_none());
    for t in [a, a + 4096, a + 4 * MIB - 8] {
        api.window_refused(comm, t, 8, SEGREG_ERR_NOT_TRACKED, "or freed");
        api.window_refused(nosym, t, 8, SEGREG_ERR_NOT_TRACKED, "or freed");
    }
    assert_eq!(api.window_get(comm, b, 8), (SEGREG_OK, wb, 0));

    // After detach: not attached, though b is live.
    assert_eq!(api.detach(comm), 1);
    api.window_refused(comm, b, 8, SEGREG_ERR_NOT_ATTACHED, "not attached");
    assert_eq!(api.comm_destroy(comm), 0);

    // The comm's address comes back: a new comm, which has no window for
    // b until its pass; never the old comm's window.
    let again = api.comm_create();
    assert_eq!(again, comm);
    assert!(api.attach(again) > 0);
    api.window_refused(again, b, 8, SEGREG_ERR_NOT_REGISTERED, "not registered");
    assert_eq!(api.register(again), 1);
    let (rc, wb2, off) = api.window_get(again, b, 8);
    assert_eq!((rc, off), (SEGREG_OK, 0));
    assert_ne!(wb2, 0);

    for c in [again, nosym] {
        assert!(api.detach(c) >= 0);
        assert_eq!(api.comm_destroy(c), 0);
    }
    api.free(b as *mut c_void, 2 * MIB);
    assert_eq!(api.violations(), 0);
    let s = api.stats();
    assert_eq!(
        (
            s.live_segments,
            s.pending_frees,
            s.windows_live,
            s.comms_attached
        ),
        (0, 0, 0, 0)
    );
    assert_eq!(s.windows_registered, s.windows_deregistered);
}
