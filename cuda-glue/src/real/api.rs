//! The NCCL entry points the glue uses, resolved once, up front, each with
//! its result read as a plain `c_int` (cudarc's wrappers would panic on a
//! missing symbol and read `ncclResult_t` as a Rust enum, for which a code
//! the bindings do not list would be undefined behaviour).
//!
//! Every call goes through [`NcclApi::result`], the one conversion of a
//! return code into a [`BackendError`], as cudarc's `result()` does.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use cudarc::nccl::sys::{
    cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId, ncclWindow_t,
};

use crate::backend::{BackendError, MIN_NCCL_VERSION};

type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type MemAllocFn = unsafe extern "C" fn(*mut *mut c_void, usize) -> c_int;
type MemFreeFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type WinRegisterFn =
    unsafe extern "C" fn(ncclComm_t, *mut c_void, usize, *mut ncclWindow_t, c_int) -> c_int;
type WinDeregisterFn = unsafe extern "C" fn(ncclComm_t, ncclWindow_t) -> c_int;
type ErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;
type LastErrorFn = unsafe extern "C" fn(ncclComm_t) -> *const c_char;
type GetUniqueIdFn = unsafe extern "C" fn(*mut ncclUniqueId) -> c_int;
type CommInitRankFn = unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> c_int;
type CommDestroyFn = unsafe extern "C" fn(ncclComm_t) -> c_int;
/// `ncclAllReduce`; the data type and the reduction are C enums (`int`).
type AllReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    ncclComm_t,
    cudaStream_t,
) -> c_int;
/// `ncclCommCuDevice`, `ncclCommCount` and `ncclCommUserRank`.
type CommQueryFn = unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int;

/// The NCCL entry points the glue uses, resolved once.
#[derive(Clone, Copy)]
pub(super) struct NcclApi {
    get_version: GetVersionFn,
    mem_alloc: MemAllocFn,
    mem_free: MemFreeFn,
    win_register: WinRegisterFn,
    win_deregister: WinDeregisterFn,
    error_string: ErrorStringFn,
    last_error: Option<LastErrorFn>,
    comm_cu_device: Option<CommQueryFn>,
    get_unique_id: GetUniqueIdFn,
    comm_init_rank: CommInitRankFn,
    comm_destroy: CommDestroyFn,
    // Used only by the multi-rank helpers: optional, so that a library
    // without them still serves the allocator; their absence is reported
    // when used.
    all_reduce: Option<AllReduceFn>,
    comm_count: Option<CommQueryFn>,
    comm_user_rank: Option<CommQueryFn>,
}

/// The NCCL library: cudarc's loader if it finds one of its candidate names
/// (`libnccl.so`, …), else `libnccl.so.2` (the name the pip wheels ship,
/// which cudarc 0.19 does not try).
fn nccl_library() -> Result<&'static libloading::Library, BackendError> {
    // SAFETY: `is_culib_present` only dlopens cudarc's candidate names and
    // drops the handles; loading NCCL runs no code with preconditions.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        // SAFETY: as above; the library was just found, so `culib` finds it
        // again (catch_unwind turns a vanished file into an error anyway).
        if let Ok(lib) = std::panic::catch_unwind(|| unsafe { cudarc::nccl::sys::culib() }) {
            return Ok(lib);
        }
    }
    static FALLBACK: OnceLock<Option<libloading::Library>> = OnceLock::new();
    FALLBACK
        .get_or_init(|| {
            // SAFETY: as above: loading NCCL runs only its initializers.
            unsafe { libloading::Library::new("libnccl.so.2") }.ok()
        })
        .as_ref()
        .ok_or(BackendError::LibraryMissing { lib: "nccl" })
}

/// Resolves one symbol as the function type `T`.
///
/// # Safety
/// `T` must be the symbol's C signature.
unsafe fn symbol<T: Copy>(
    lib: &'static libloading::Library,
    name: &'static str,
) -> Result<T, BackendError> {
    // SAFETY: the caller guarantees the type; the library is never unloaded
    // ('static), so the pointer stays valid.
    let sym = unsafe { lib.get::<T>(name.as_bytes()) };
    sym.map(|s| *s).map_err(|_| BackendError::SymbolMissing {
        lib: "nccl",
        symbol: name,
    })
}

/// Resolves a symbol as the type the surrounding field or binding names.
macro_rules! sym {
    ($lib:expr, $name:literal) => {
        // SAFETY: every field type of `NcclApi` is the C prototype of the
        // symbol it is loaded from (nccl.h 2.28, `ncclResult_t` read as
        // `int`).
        unsafe { symbol($lib, $name) }
    };
}

/// An optional entry point, or the error that names it.
fn present<T>(f: Option<T>, symbol: &'static str) -> Result<T, BackendError> {
    f.ok_or(BackendError::SymbolMissing {
        lib: "nccl",
        symbol,
    })
}

fn c_str(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: NCCL returns NUL-terminated strings that live at least until
    // the next NCCL call on this thread; copied here.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

impl NcclApi {
    /// Loads NCCL and resolves every entry point; refuses an NCCL older
    /// than [`MIN_NCCL_VERSION`]. Returns the API and the version.
    pub(super) fn load() -> Result<(NcclApi, i32), BackendError> {
        let lib = nccl_library()?;
        let api = NcclApi {
            get_version: sym!(lib, "ncclGetVersion")?,
            mem_alloc: sym!(lib, "ncclMemAlloc")?,
            mem_free: sym!(lib, "ncclMemFree")?,
            win_register: sym!(lib, "ncclCommWindowRegister")?,
            win_deregister: sym!(lib, "ncclCommWindowDeregister")?,
            error_string: sym!(lib, "ncclGetErrorString")?,
            last_error: sym!(lib, "ncclGetLastError").ok(),
            comm_cu_device: sym!(lib, "ncclCommCuDevice").ok(),
            get_unique_id: sym!(lib, "ncclGetUniqueId")?,
            comm_init_rank: sym!(lib, "ncclCommInitRank")?,
            comm_destroy: sym!(lib, "ncclCommDestroy")?,
            all_reduce: sym!(lib, "ncclAllReduce").ok(),
            comm_count: sym!(lib, "ncclCommCount").ok(),
            comm_user_rank: sym!(lib, "ncclCommUserRank").ok(),
        };
        let version = api.version()?;
        if version < MIN_NCCL_VERSION {
            return Err(BackendError::NcclTooOld {
                found: version,
                required: MIN_NCCL_VERSION,
            });
        }
        Ok((api, version))
    }

    /// The one conversion of an `ncclResult_t`: `Ok` for success, else the
    /// call, the code, `ncclGetErrorString` and, given the comm the call
    /// was made on, `ncclGetLastError`.
    fn result(
        &self,
        call: &'static str,
        rc: c_int,
        comm: Option<ncclComm_t>,
    ) -> Result<(), BackendError> {
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString accepts any code and returns a static
        // string (or null, handled by `c_str`).
        let mut message = c_str(unsafe { (self.error_string)(rc) });
        if let (Some(last), Some(comm)) = (self.last_error, comm) {
            // SAFETY: `comm` is the non-null comm the failed call was made
            // on; the returned string belongs to NCCL (copied at once).
            let detail = c_str(unsafe { last(comm) });
            if !detail.is_empty() {
                message.push_str(": ");
                message.push_str(&detail);
            }
        }
        Err(BackendError::Nccl {
            call,
            code: rc,
            message,
        })
    }

    /// `ncclGetVersion` (e.g. 22809 for 2.28.9).
    pub(super) fn version(&self) -> Result<i32, BackendError> {
        let mut v: c_int = 0;
        // SAFETY: valid out-pointer.
        let rc = unsafe { (self.get_version)(&mut v) };
        self.result("ncclGetVersion", rc, None)?;
        Ok(v)
    }

    /// `ncclMemAlloc` on the current device.
    pub(super) fn mem_alloc(&self, size: usize) -> Result<*mut c_void, BackendError> {
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer; NCCL allocates on the current device.
        let rc = unsafe { (self.mem_alloc)(&mut ptr, size) };
        self.result("ncclMemAlloc", rc, None)?;
        Ok(ptr)
    }

    /// `ncclMemFree`.
    ///
    /// # Safety
    /// `ptr` came from `ncclMemAlloc`, is not freed yet, and no window
    /// covers it.
    pub(super) unsafe fn mem_free(&self, ptr: *mut c_void) -> Result<(), BackendError> {
        // SAFETY: the caller's guarantee.
        self.result("ncclMemFree", unsafe { (self.mem_free)(ptr) }, None)
    }

    /// `ncclCommWindowRegister` (collective); a null window means no
    /// symmetric support.
    ///
    /// # Safety
    /// `comm` is a live comm of this process; `[ptr, ptr + size)` is
    /// `ncclMemAlloc` memory.
    pub(super) unsafe fn window_register(
        &self,
        comm: ncclComm_t,
        ptr: *mut c_void,
        size: usize,
        flags: c_int,
    ) -> Result<ncclWindow_t, BackendError> {
        let mut win: ncclWindow_t = std::ptr::null_mut();
        // SAFETY: the caller's guarantee; valid out-pointer.
        let rc = unsafe { (self.win_register)(comm, ptr, size, &mut win, flags) };
        self.result("ncclCommWindowRegister", rc, Some(comm))?;
        Ok(win)
    }

    /// `ncclCommWindowDeregister`.
    ///
    /// # Safety
    /// `win` was returned by `ncclCommWindowRegister` on the live `comm`
    /// and is not deregistered yet.
    pub(super) unsafe fn window_deregister(
        &self,
        comm: ncclComm_t,
        win: ncclWindow_t,
    ) -> Result<(), BackendError> {
        // SAFETY: the caller's guarantee.
        let rc = unsafe { (self.win_deregister)(comm, win) };
        self.result("ncclCommWindowDeregister", rc, Some(comm))
    }

    /// `ncclGetUniqueId`.
    pub(super) fn unique_id(&self) -> Result<ncclUniqueId, BackendError> {
        let mut id = ncclUniqueId { internal: [0; 128] };
        // SAFETY: valid out-pointer of the right type.
        let rc = unsafe { (self.get_unique_id)(&mut id) };
        self.result("ncclGetUniqueId", rc, None)?;
        Ok(id)
    }

    /// `ncclCommInitRank` on the current device (collective: blocks until
    /// every rank has called it with the same id).
    pub(super) fn comm_init_rank(
        &self,
        nranks: c_int,
        id: ncclUniqueId,
        rank: c_int,
    ) -> Result<ncclComm_t, BackendError> {
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the id is passed by value as NCCL's
        // prototype says; NCCL checks the rank against nranks.
        let rc = unsafe { (self.comm_init_rank)(&mut comm, nranks, id, rank) };
        self.result("ncclCommInitRank", rc, None)?;
        Ok(comm)
    }

    /// `ncclCommDestroy`.
    ///
    /// # Safety
    /// `comm` is a live comm that no other thread uses, never used after.
    pub(super) unsafe fn comm_destroy(&self, comm: ncclComm_t) -> Result<(), BackendError> {
        // SAFETY: the caller's guarantee.
        self.result(
            "ncclCommDestroy",
            unsafe { (self.comm_destroy)(comm) },
            None,
        )
    }

    /// `ncclCommCuDevice`, or `None` if this NCCL lacks it.
    ///
    /// # Safety
    /// `comm` is a live comm of this process.
    pub(super) unsafe fn comm_cu_device(
        &self,
        comm: ncclComm_t,
    ) -> Result<Option<i32>, BackendError> {
        let Some(f) = self.comm_cu_device else {
            return Ok(None);
        };
        // SAFETY: the caller's guarantee.
        Ok(Some(unsafe { self.query(f, "ncclCommCuDevice", comm) }?))
    }

    /// `ncclCommCount`.
    ///
    /// # Safety
    /// `comm` is a live comm of this process.
    pub(super) unsafe fn comm_count(&self, comm: ncclComm_t) -> Result<i32, BackendError> {
        let f = present(self.comm_count, "ncclCommCount")?;
        // SAFETY: the caller's guarantee.
        unsafe { self.query(f, "ncclCommCount", comm) }
    }

    /// `ncclCommUserRank`.
    ///
    /// # Safety
    /// `comm` is a live comm of this process.
    pub(super) unsafe fn comm_user_rank(&self, comm: ncclComm_t) -> Result<i32, BackendError> {
        let f = present(self.comm_user_rank, "ncclCommUserRank")?;
        // SAFETY: the caller's guarantee.
        unsafe { self.query(f, "ncclCommUserRank", comm) }
    }

    /// One of the `int`-valued comm queries.
    ///
    /// # Safety
    /// `comm` is a live comm of this process.
    unsafe fn query(
        &self,
        f: CommQueryFn,
        call: &'static str,
        comm: ncclComm_t,
    ) -> Result<i32, BackendError> {
        let mut v: c_int = -1;
        // SAFETY: the caller's guarantee; valid out-pointer.
        self.result(call, unsafe { f(comm, &mut v) }, Some(comm))?;
        Ok(v)
    }

    /// `ncclAllReduce(src, dst, count, ncclFloat32, ncclSum, comm)` on the
    /// legacy default stream of the current context.
    ///
    /// # Safety
    /// `comm` is a live comm of this process whose device is current;
    /// `src` and `dst` are device memory of it holding `count` f32 each.
    pub(super) unsafe fn all_reduce_sum_f32(
        &self,
        src: *const c_void,
        dst: *mut c_void,
        count: usize,
        comm: ncclComm_t,
    ) -> Result<(), BackendError> {
        let f = present(self.all_reduce, "ncclAllReduce")?;
        let (float, sum) = (
            ncclDataType_t::ncclFloat32 as c_int,
            ncclRedOp_t::ncclSum as c_int,
        );
        // SAFETY: the caller's guarantee; null stream: the default one.
        let rc = unsafe { f(src, dst, count, float, sum, comm, std::ptr::null_mut()) };
        self.result("ncclAllReduce", rc, Some(comm))
    }
}
