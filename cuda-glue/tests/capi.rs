//! The C ABI, driven through the cdylib's exported symbols (dlopen, as
//! PyTorch's CUDAPluggableAllocator does), on the simulated backend. Bad
//! input included: null, unknown pointer, double free, unknown comm.
//!
//! One test function: the library keeps one process-wide allocator.
#![cfg(not(feature = "loom"))]

mod cdylib;

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr::null_mut;

use libloading::{Library, Symbol};
use segment_registry_nccl::capi::SegregStats;

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
    comm_destroy: Symbol<'l, CommFn>,
    violations: Symbol<'l, Count>,
}

/// Looks a symbol up as the C prototype the field it fills declares.
macro_rules! sym {
    ($lib:expr, $name:literal) => {
        // SAFETY: each field type of `Api` is the C prototype of the symbol
        // it is loaded from (include/segment_registry.h, checked against
        // src/capi.rs by tests/header.rs).
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
        comm_destroy: sym!(lib, b"segreg_sim_comm_destroy"),
        violations: sym!(lib, b"segreg_sim_violations"),
    }
}

/// Safe wrappers: the library takes device pointers and comm handles as
/// opaque values (it never dereferences them and refuses unknown ones), so
/// any value is a valid argument; only `segreg_stats` writes through its
/// pointer, which the wrappers pass valid or null.
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
    assert_eq!((s.comms_attached, s.sim_violations), (0, 0));
}
