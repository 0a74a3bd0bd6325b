//! The real backend: NCCL and the CUDA driver, loaded at run time through
//! cudarc (`dynamic-loading`), so the crate builds and runs on machines
//! without CUDA and reports their absence as a typed error.
//!
//! cudarc's generated wrappers look each symbol up on first call and panic
//! when it is missing, and they return `ncclResult_t` as a Rust enum (a code
//! the bindings do not list would be undefined behaviour). So this module
//! takes the library handle from cudarc (`cudarc::nccl::sys::culib`, after
//! `is_culib_present`), resolves every NCCL symbol it uses once, up front,
//! with the result typed as a plain `c_int`, and turns a missing library,
//! a missing symbol or an old NCCL into a [`BackendError`]. The CUDA driver
//! goes through cudarc's safe `CudaContext` (primary context per device).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::result::ctx;
use cudarc::driver::sys::CUcontext;
use cudarc::driver::CudaContext;
use cudarc::nccl::sys::{
    cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId, ncclWindow_t,
};

use crate::backend::{Backend, BackendError, RawComm, Window, MIN_NCCL_VERSION};
use crate::util::lock;

type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type MemAllocFn = unsafe extern "C" fn(*mut *mut c_void, usize) -> c_int;
type MemFreeFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type WinRegisterFn =
    unsafe extern "C" fn(ncclComm_t, *mut c_void, usize, *mut ncclWindow_t, c_int) -> c_int;
type WinDeregisterFn = unsafe extern "C" fn(ncclComm_t, ncclWindow_t) -> c_int;
type ErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;
type LastErrorFn = unsafe extern "C" fn(ncclComm_t) -> *const c_char;
type CommCuDeviceFn = unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int;
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
/// `ncclCommCount` and `ncclCommUserRank`.
type CommQueryFn = unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int;

/// The NCCL entry points the glue uses, resolved once.
#[derive(Clone, Copy)]
struct NcclApi {
    get_version: GetVersionFn,
    mem_alloc: MemAllocFn,
    mem_free: MemFreeFn,
    win_register: WinRegisterFn,
    win_deregister: WinDeregisterFn,
    error_string: ErrorStringFn,
    last_error: Option<LastErrorFn>,
    comm_cu_device: Option<CommCuDeviceFn>,
    get_unique_id: GetUniqueIdFn,
    comm_init_rank: CommInitRankFn,
    comm_destroy: CommDestroyFn,
    // Used only by the multi-rank helpers below (`comm_init_rank`,
    // `all_reduce_sum_f32`, ...): optional, so that a library without them
    // still serves the allocator; their absence is reported when used.
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

impl NcclApi {
    fn load() -> Result<(NcclApi, i32), BackendError> {
        let lib = nccl_library()?;
        let get_version: GetVersionFn = sym!(lib, "ncclGetVersion")?;
        let mut version: c_int = 0;
        // SAFETY: `version` is a valid out-pointer.
        let rc = unsafe { get_version(&mut version) };
        if rc != 0 {
            return Err(BackendError::Nccl {
                call: "ncclGetVersion",
                code: rc,
                message: "could not read the NCCL version".into(),
            });
        }
        if version < MIN_NCCL_VERSION {
            return Err(BackendError::NcclTooOld {
                found: version,
                required: MIN_NCCL_VERSION,
            });
        }
        let api = NcclApi {
            get_version,
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
        Ok((api, version))
    }

    fn error(&self, call: &'static str, code: c_int, comm: Option<ncclComm_t>) -> BackendError {
        // SAFETY: ncclGetErrorString accepts any code and returns a static
        // string (or null, handled by `c_str`).
        let mut message = c_str(unsafe { (self.error_string)(code) });
        if let (Some(last), Some(comm)) = (self.last_error, comm) {
            // SAFETY: `comm` is the non-null comm the failed call was made
            // on; the returned string belongs to NCCL (copied at once).
            let detail = c_str(unsafe { last(comm) });
            if !detail.is_empty() {
                message.push_str(": ");
                message.push_str(&detail);
            }
        }
        BackendError::Nccl {
            call,
            code,
            message,
        }
    }
}

fn c_str(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: NCCL returns NUL-terminated strings that live at least until
    // the next NCCL call on this thread; copied here.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The real NCCL backend.
pub struct RealBackend {
    api: NcclApi,
    version: i32,
    contexts: Mutex<HashMap<i32, Arc<CudaContext>>>,
    /// Device of every pointer this backend allocated and has not freed.
    devices: Mutex<HashMap<usize, i32>>,
    next_generation: AtomicU64,
}

impl std::fmt::Debug for RealBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealBackend")
            .field("nccl_version", &self.version)
            .finish_non_exhaustive()
    }
}

impl RealBackend {
    /// Loads the CUDA driver and NCCL. Fails with a typed error, never a
    /// panic, when either library is missing, a symbol is missing, NCCL is
    /// older than 2.28, or the driver does not initialize.
    pub fn new() -> Result<Self, BackendError> {
        // SAFETY: only dlopens candidate names of the driver library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(BackendError::LibraryMissing { lib: "cuda" });
        }
        let (api, version) = NcclApi::load()?;
        guard_driver("cuInit", cudarc::driver::result::init)?;
        Ok(RealBackend {
            api,
            version,
            contexts: Mutex::new(HashMap::new()),
            devices: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
        })
    }

    /// `ncclGetVersion` (e.g. 22809 for 2.28.9).
    pub fn nccl_version(&self) -> i32 {
        self.version
    }

    /// The version NCCL reports now (re-read; for diagnostics).
    pub fn read_version(&self) -> Result<i32, BackendError> {
        let mut v: c_int = 0;
        // SAFETY: valid out-pointer.
        let rc = unsafe { (self.api.get_version)(&mut v) };
        if rc != 0 {
            return Err(self.api.error("ncclGetVersion", rc, None));
        }
        Ok(v)
    }

    /// Number of CUDA devices.
    pub fn device_count(&self) -> Result<i32, BackendError> {
        guard_driver("cuDeviceGetCount", CudaContext::device_count)
    }

    /// The primary context of `device`, retained once (PyTorch uses the
    /// same primary context). Creating it leaves the calling thread's
    /// current context as it was.
    fn context(&self, device: i32) -> Result<Arc<CudaContext>, BackendError> {
        let ordinal = usize::try_from(device).map_err(|_| BackendError::InvalidArgument {
            call: "cuDevicePrimaryCtxRetain",
            reason: format!("negative device {device}"),
        })?;
        let mut map = lock(&self.contexts);
        if let Some(c) = map.get(&device) {
            return Ok(c.clone());
        }
        // `CudaContext::new` binds the new context to this thread: restore.
        let prev = current_context()?;
        let made = guard_driver("cuDevicePrimaryCtxRetain", || CudaContext::new(ordinal));
        restore_context(prev)?;
        let c = made?;
        map.insert(device, c.clone());
        Ok(c)
    }

    /// Binds `device`'s primary context to the calling thread and leaves it
    /// bound (for callers that then use the CUDA driver or NCCL directly,
    /// like the GPU tests). The backend's own calls never need this: they
    /// bind for the call and restore the thread's context afterwards.
    pub fn bind_device(&self, device: i32) -> Result<Arc<CudaContext>, BackendError> {
        let ctx = self.context(device)?;
        guard_driver("cuCtxSetCurrent", || ctx.bind_to_thread())?;
        Ok(ctx)
    }

    /// Runs `f` with `device`'s primary context current, then restores the
    /// thread's previous current context (a PyTorch thread keeps its current
    /// device whatever device we allocate or free on).
    fn on_device<T>(
        &self,
        device: i32,
        f: impl FnOnce() -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let target = self.context(device)?.cu_ctx();
        let prev = current_context()?;
        if prev == Some(target) {
            return f();
        }
        // SAFETY: `target` is a primary context this backend retained and
        // keeps alive in `contexts`.
        guard_driver("cuCtxSetCurrent", || unsafe { ctx::set_current(target) })?;
        let r = f();
        let restored = restore_context(prev);
        let v = r?;
        restored?;
        Ok(v)
    }

    /// `(free, total)` device memory (`cuMemGetInfo`) on `device`.
    pub fn mem_get_info(&self, device: i32) -> Result<(usize, usize), BackendError> {
        self.on_device(device, || {
            guard_driver("cuMemGetInfo", cudarc::driver::result::mem_get_info)
        })
    }

    /// The device a comm lives on (`ncclCommCuDevice`), if NCCL says.
    fn comm_device(&self, comm: ncclComm_t) -> Result<Option<i32>, BackendError> {
        let Some(f) = self.api.comm_cu_device else {
            return Ok(None);
        };
        let mut dev: c_int = -1;
        // SAFETY: `comm` is non-null (checked by the callers) and the caller
        // vouches that it is a live comm; `dev` is a valid out-pointer.
        let rc = unsafe { f(comm, &mut dev) };
        if rc != 0 {
            return Err(self.api.error("ncclCommCuDevice", rc, Some(comm)));
        }
        Ok(Some(dev))
    }

    /// Runs `f` on the comm's device (see `on_device`), or as is when NCCL
    /// cannot say which device that is.
    fn on_comm_device<T>(
        &self,
        comm: ncclComm_t,
        f: impl FnOnce() -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        match self.comm_device(comm)? {
            Some(dev) => self.on_device(dev, f),
            None => f(),
        }
    }

    /// Creates a one-rank communicator on `device` (`ncclGetUniqueId` +
    /// `ncclCommInitRank`), for the demo and the GPU tests.
    pub fn comm_init_one_rank(&self, device: i32) -> Result<RawComm, BackendError> {
        self.on_device(device, || self.comm_init_one_rank_here())
    }

    fn comm_init_one_rank_here(&self) -> Result<RawComm, BackendError> {
        let mut id = ncclUniqueId { internal: [0; 128] };
        // SAFETY: valid out-pointer of the right type.
        let rc = unsafe { (self.api.get_unique_id)(&mut id) };
        if rc != 0 {
            return Err(self.api.error("ncclGetUniqueId", rc, None));
        }
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer; one rank, rank 0, of a fresh id.
        let rc = unsafe { (self.api.comm_init_rank)(&mut comm, 1, id, 0) };
        if rc != 0 {
            return Err(self.api.error("ncclCommInitRank", rc, None));
        }
        Ok(RawComm(comm as usize))
    }

    /// `ncclCommDestroy`. Detach the comm from every allocator first.
    ///
    /// # Safety
    /// `comm` must be a live comm that no other thread uses, and it must not
    /// be used afterwards.
    pub unsafe fn comm_destroy(&self, comm: RawComm) -> Result<(), BackendError> {
        if comm.is_null() {
            return Err(BackendError::NullComm {
                call: "ncclCommDestroy",
            });
        }
        // SAFETY: the caller guarantees a live, unshared comm.
        let rc = unsafe { (self.api.comm_destroy)(comm.0 as ncclComm_t) };
        if rc != 0 {
            return Err(self.api.error("ncclCommDestroy", rc, None));
        }
        Ok(())
    }
}

/// The calling thread's current context (`cuCtxGetCurrent`).
fn current_context() -> Result<Option<CUcontext>, BackendError> {
    guard_driver("cuCtxGetCurrent", ctx::get_current)
}

/// Makes `prev` (a context that was current on this thread a moment ago, or
/// none) current again.
fn restore_context(prev: Option<CUcontext>) -> Result<(), BackendError> {
    let c = prev.unwrap_or(std::ptr::null_mut());
    // SAFETY: `c` was current on this thread before our call, which did not
    // destroy it; null unbinds.
    guard_driver("cuCtxSetCurrent", || unsafe { ctx::set_current(c) })
}

/// Runs a cudarc driver call, turning its error (and a panic from a missing
/// driver symbol) into a [`BackendError::Driver`].
fn guard_driver<T>(
    call: &'static str,
    f: impl FnOnce() -> Result<T, cudarc::driver::DriverError>,
) -> Result<T, BackendError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(BackendError::Driver {
            call,
            message: format!("{e:?}"),
        }),
        Err(_) => Err(BackendError::Driver {
            call,
            message: "the driver library lacks a required symbol".into(),
        }),
    }
}

impl Backend for RealBackend {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn mem_alloc(&self, size: usize, device: i32) -> Result<usize, BackendError> {
        if size == 0 {
            return Err(BackendError::InvalidArgument {
                call: "ncclMemAlloc",
                reason: "zero size".into(),
            });
        }
        let mut ptr: *mut c_void = std::ptr::null_mut();
        self.on_device(device, || {
            // SAFETY: valid out-pointer; the device's primary context is
            // current (ncclMemAlloc allocates on the current device).
            let rc = unsafe { (self.api.mem_alloc)(&mut ptr, size) };
            match rc {
                0 => Ok(()),
                _ => Err(self.api.error("ncclMemAlloc", rc, None)),
            }
        })?;
        if ptr.is_null() {
            return Err(BackendError::Nccl {
                call: "ncclMemAlloc",
                code: 0,
                message: "returned success and a null pointer".into(),
            });
        }
        lock(&self.devices).insert(ptr as usize, device);
        Ok(ptr as usize)
    }

    fn mem_free(&self, ptr: usize) -> Result<(), BackendError> {
        // Out of the map before ncclMemFree: once NCCL has the block back,
        // another thread's ncclMemAlloc may return the same address and
        // insert its own entry, which a later remove would delete.
        let Some(device) = lock(&self.devices).remove(&ptr) else {
            return Err(BackendError::InvalidArgument {
                call: "ncclMemFree",
                reason: format!("{ptr:#x} was not allocated by this backend"),
            });
        };
        let freed = self.on_device(device, || {
            // SAFETY: `ptr` came from ncclMemAlloc and was not freed (it was
            // in `devices`, and only this call took it out); the allocator
            // deregistered every window over it.
            let rc = unsafe { (self.api.mem_free)(ptr as *mut c_void) };
            match rc {
                0 => Ok(()),
                _ => Err(self.api.error("ncclMemFree", rc, None)),
            }
        });
        if freed.is_err() {
            // NCCL kept the memory, so no alloc can have the address: the
            // entry goes back for a retry.
            lock(&self.devices).insert(ptr, device);
        }
        freed
    }

    fn comm_window_register(
        &self,
        comm: RawComm,
        ptr: usize,
        size: usize,
        flags: i32,
    ) -> Result<Option<Window>, BackendError> {
        if comm.is_null() {
            return Err(BackendError::NullComm {
                call: "ncclCommWindowRegister",
            });
        }
        if ptr == 0 || size == 0 {
            return Err(BackendError::InvalidArgument {
                call: "ncclCommWindowRegister",
                reason: format!("buffer {ptr:#x} of {size} bytes"),
            });
        }
        let c = comm.0 as ncclComm_t;
        let mut win: ncclWindow_t = std::ptr::null_mut();
        self.on_comm_device(c, || {
            // SAFETY: non-null comm the caller attached (a live
            // ncclComm_t); the buffer is ncclMemAlloc memory of `size`
            // bytes; valid out-pointer.
            let rc =
                unsafe { (self.api.win_register)(c, ptr as *mut c_void, size, &mut win, flags) };
            match rc {
                0 => Ok(()),
                _ => Err(self.api.error("ncclCommWindowRegister", rc, Some(c))),
            }
        })?;
        if win.is_null() {
            // NCCL 2.29+ without symmetric support: registered, no window.
            return Ok(None);
        }
        Ok(Some(Window {
            raw: win as usize,
            // Relaxed: a unique number, no ordering with anything else.
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
        }))
    }

    fn comm_window_deregister(&self, comm: RawComm, window: Window) -> Result<(), BackendError> {
        if comm.is_null() {
            return Err(BackendError::NullComm {
                call: "ncclCommWindowDeregister",
            });
        }
        if window.raw == 0 {
            return Err(BackendError::InvalidArgument {
                call: "ncclCommWindowDeregister",
                reason: "null window".into(),
            });
        }
        let c = comm.0 as ncclComm_t;
        self.on_comm_device(c, || {
            // SAFETY: the window was returned by ncclCommWindowRegister on
            // this comm and is deregistered exactly once (the registry hands
            // each window back once).
            let rc = unsafe { (self.api.win_deregister)(c, window.raw as ncclWindow_t) };
            match rc {
                0 => Ok(()),
                _ => Err(self.api.error("ncclCommWindowDeregister", rc, Some(c))),
            }
        })
    }
}

// ----------------------------------------------------------------------
// Multi-rank helpers: one process per GPU (the two-rank program,
// `src/bin/two_ranks.rs`). Symbols resolved up front like the others;
// the optional ones are reported as `SymbolMissing` when first used.
// ----------------------------------------------------------------------

/// An NCCL unique id (`ncclUniqueId`): 128 opaque bytes that one rank makes
/// with [`RealBackend::unique_id`] and every rank of the new comm passes to
/// [`RealBackend::comm_init_rank`]. It travels between processes as hex
/// ([`to_hex`](Self::to_hex), [`from_hex`](Self::from_hex)).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId(pub [u8; UniqueId::LEN]);

impl UniqueId {
    /// `NCCL_UNIQUE_ID_BYTES`.
    pub const LEN: usize = 128;

    /// Lower-case hex, 256 characters.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`to_hex`](Self::to_hex)'s output (surrounding whitespace
    /// ignored). A wrong length or a non-hex character is a typed error.
    pub fn from_hex(s: &str) -> Result<Self, BackendError> {
        let s = s.trim();
        let bad = |reason: String| BackendError::InvalidArgument {
            call: "ncclUniqueId",
            reason,
        };
        if s.len() != 2 * Self::LEN || !s.is_ascii() {
            return Err(bad(format!(
                "expected {} hex characters, got {} characters",
                2 * Self::LEN,
                s.len()
            )));
        }
        let mut out = [0u8; Self::LEN];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| bad(format!("not hex at byte {i}: {:?}", &s[2 * i..2 * i + 2])))?;
        }
        Ok(UniqueId(out))
    }

    fn to_nccl(self) -> ncclUniqueId {
        let mut id = ncclUniqueId { internal: [0; 128] };
        for (d, s) in id.internal.iter_mut().zip(self.0) {
            *d = s as c_char;
        }
        id
    }

    fn from_nccl(id: &ncclUniqueId) -> Self {
        let mut out = [0u8; Self::LEN];
        for (d, s) in out.iter_mut().zip(id.internal) {
            *d = s as u8;
        }
        UniqueId(out)
    }
}

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = self.to_hex();
        write!(f, "UniqueId({}…)", &h[..16])
    }
}

impl RealBackend {
    /// `ncclGetUniqueId`: a fresh id for a new comm (rank 0 makes it and
    /// hands it to the other ranks). Needs no device.
    pub fn unique_id(&self) -> Result<UniqueId, BackendError> {
        let mut id = ncclUniqueId { internal: [0; 128] };
        // SAFETY: valid out-pointer of the right type.
        let rc = unsafe { (self.api.get_unique_id)(&mut id) };
        if rc != 0 {
            return Err(self.api.error("ncclGetUniqueId", rc, None));
        }
        Ok(UniqueId::from_nccl(&id))
    }

    /// `ncclCommInitRank(nranks, id, rank)` on `device`: joins rank `rank`
    /// of a comm of `nranks` ranks. Collective: blocks until every rank has
    /// called it with the same id (bound it with a watchdog). Leaves the
    /// thread's current context as it was.
    pub fn comm_init_rank(
        &self,
        device: i32,
        nranks: i32,
        rank: i32,
        id: &UniqueId,
    ) -> Result<RawComm, BackendError> {
        if nranks < 1 || rank < 0 || rank >= nranks {
            return Err(BackendError::InvalidArgument {
                call: "ncclCommInitRank",
                reason: format!("rank {rank} of {nranks}"),
            });
        }
        let id = id.to_nccl();
        self.on_device(device, || {
            let mut comm: ncclComm_t = std::ptr::null_mut();
            // SAFETY: valid out-pointer; `rank` is in [0, nranks); the id
            // is passed by value as NCCL's prototype says.
            let rc = unsafe { (self.api.comm_init_rank)(&mut comm, nranks, id, rank) };
            if rc != 0 {
                return Err(self.api.error("ncclCommInitRank", rc, None));
            }
            if comm.is_null() {
                return Err(BackendError::Nccl {
                    call: "ncclCommInitRank",
                    code: 0,
                    message: "returned success and a null comm".into(),
                });
            }
            Ok(RawComm(comm as usize))
        })
    }

    /// `(ncclCommCount, ncclCommUserRank)`: the comm's size and this
    /// process's rank in it.
    ///
    /// # Safety
    /// `comm` must be a live comm made by this process.
    pub unsafe fn comm_rank_info(&self, comm: RawComm) -> Result<(i32, i32), BackendError> {
        if comm.is_null() {
            return Err(BackendError::NullComm {
                call: "ncclCommCount",
            });
        }
        let c = comm.0 as ncclComm_t;
        let query = |f: Option<CommQueryFn>, call: &'static str| {
            let f = f.ok_or(BackendError::SymbolMissing {
                lib: "nccl",
                symbol: call,
            })?;
            let mut v: c_int = -1;
            // SAFETY: the caller guarantees a live comm; valid out-pointer.
            let rc = unsafe { f(c, &mut v) };
            if rc != 0 {
                return Err(self.api.error(call, rc, Some(c)));
            }
            Ok(v)
        };
        Ok((
            query(self.api.comm_count, "ncclCommCount")?,
            query(self.api.comm_user_rank, "ncclCommUserRank")?,
        ))
    }

    /// `ncclAllReduce(src, dst, count, ncclFloat32, ncclSum, comm)` on the
    /// default stream of the comm's device, then waits for it
    /// (`cuCtxSynchronize`). Collective: every rank of the comm must call
    /// it. `src == dst` is in place. The caller serializes it with every
    /// other NCCL call on the comm (the allocator's registration passes
    /// included).
    ///
    /// # Safety
    /// `comm` must be a live comm of this process; `src` and `dst` must be
    /// device memory of the comm's device holding at least `count` f32 each.
    pub unsafe fn all_reduce_sum_f32(
        &self,
        comm: RawComm,
        src: usize,
        dst: usize,
        count: usize,
    ) -> Result<(), BackendError> {
        if comm.is_null() {
            return Err(BackendError::NullComm {
                call: "ncclAllReduce",
            });
        }
        if src == 0 || dst == 0 {
            return Err(BackendError::InvalidArgument {
                call: "ncclAllReduce",
                reason: format!("buffers {src:#x} -> {dst:#x}"),
            });
        }
        let f = self.api.all_reduce.ok_or(BackendError::SymbolMissing {
            lib: "nccl",
            symbol: "ncclAllReduce",
        })?;
        let c = comm.0 as ncclComm_t;
        self.on_comm_device(c, || {
            // SAFETY: the caller guarantees a live comm and `count` f32 in
            // both buffers on its device (current here); null stream: the
            // legacy default stream of that context.
            let rc = unsafe {
                f(
                    src as *const c_void,
                    dst as *mut c_void,
                    count,
                    ncclDataType_t::ncclFloat32 as c_int,
                    ncclRedOp_t::ncclSum as c_int,
                    c,
                    std::ptr::null_mut(),
                )
            };
            if rc != 0 {
                return Err(self.api.error("ncclAllReduce", rc, Some(c)));
            }
            guard_driver("cuCtxSynchronize", ctx::synchronize)
        })
    }

    /// Copies `data` to device memory at `dst` on `device` (synchronous).
    ///
    /// # Safety
    /// `dst` must be device memory of `device` with room for `data`.
    pub unsafe fn copy_to_device_f32(
        &self,
        device: i32,
        dst: usize,
        data: &[f32],
    ) -> Result<(), BackendError> {
        self.on_device(device, || {
            guard_driver("cuMemcpyHtoD", || {
                // SAFETY: the caller guarantees room for `data` at `dst`.
                unsafe { cudarc::driver::result::memcpy_htod_sync(dst as u64, data) }
            })
        })
    }

    /// Reads `n` f32 from device memory at `src` on `device` (synchronous).
    ///
    /// # Safety
    /// `src` must be device memory of `device` holding at least `n` f32.
    pub unsafe fn copy_from_device_f32(
        &self,
        device: i32,
        src: usize,
        n: usize,
    ) -> Result<Vec<f32>, BackendError> {
        let mut out = vec![0f32; n];
        self.on_device(device, || {
            guard_driver("cuMemcpyDtoH", || {
                // SAFETY: the caller guarantees `n` f32 at `src`; `out`
                // holds `n`.
                unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut out, src as u64) }
            })
        })?;
        Ok(out)
    }
}
