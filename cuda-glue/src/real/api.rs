//! The NCCL entry points the glue uses, resolved once, up front, each with
//! its result read as a plain `c_int` (cudarc's wrappers would panic on a
//! missing symbol and read `ncclResult_t` as a Rust enum, for which a code
//! the bindings do not list would be undefined behaviour).
//!
//! Every call goes through [`NcclApi::result`], the one conversion of a
//! return code into a [`BackendError`], as cudarc's `result()` does.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::OnceLock;

use cudarc::nccl::sys::{
    cudaStream_t, ncclComm, ncclComm_t, ncclConfig_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId,
    ncclWindow_t,
};

use crate::backend::{
    AtDeadline, BackendError, Backoff, CommProgress, RawComm, Wait, MIN_NCCL_VERSION,
    NCCL_IN_PROGRESS,
};

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
/// `ncclCommCuDevice`, `ncclCommCount`, `ncclCommUserRank`, and
/// `ncclCommGetAsyncError` (whose `ncclResult_t*` is read as an `int*`).
type CommQueryFn = unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int;
/// `ncclCommSplit(comm, color, key, newcomm, config)`.
type CommSplitFn =
    unsafe extern "C" fn(ncclComm_t, c_int, c_int, *mut ncclComm_t, *mut ncclConfig_t) -> c_int;
/// `ncclCommInitRankConfig(newcomm, nranks, id, rank, config)`.
type CommInitRankConfigFn =
    unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int, *mut ncclConfig_t) -> c_int;
/// `ncclCommAbort`, `ncclCommFinalize`.
type CommFn = unsafe extern "C" fn(ncclComm_t) -> c_int;

/// `NCCL_CONFIG_UNDEF_INT`: "let NCCL choose".
const CONFIG_UNDEF_INT: c_int = c_int::MIN;
/// The `magic` of an initialized `ncclConfig_t`.
const CONFIG_MAGIC: u32 = 0xcafe_beef;
/// The version of the `ncclConfig_t` layout cudarc's `nccl-02028` bindings
/// describe (2.28.0): NCCL reads only the fields that version has.
const CONFIG_VERSION: u32 = 22800;
/// `ncclUint64` and `ncclMax`, as C ints.
const UINT64: c_int = ncclDataType_t::ncclUint64 as c_int;
const MAX: c_int = ncclRedOp_t::ncclMax as c_int;

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: a non-blocking comm,
/// every other field left to NCCL.
pub(super) fn nonblocking_config() -> ncclConfig_t {
    ncclConfig_t {
        size: std::mem::size_of::<ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: CONFIG_UNDEF_INT,
        minCTAs: CONFIG_UNDEF_INT,
        maxCTAs: CONFIG_UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: CONFIG_UNDEF_INT,
        trafficClass: CONFIG_UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: CONFIG_UNDEF_INT,
        CTAPolicy: CONFIG_UNDEF_INT,
        shrinkShare: CONFIG_UNDEF_INT,
        nvlsCTAs: CONFIG_UNDEF_INT,
        nChannelsPerNetPeer: CONFIG_UNDEF_INT,
        nvlinkCentricSched: CONFIG_UNDEF_INT,
    }
}

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
    // Used only by checked comms and deadlines: optional as above.
    comm_split: Option<CommSplitFn>,
    comm_init_rank_config: Option<CommInitRankConfigFn>,
    comm_abort: Option<CommFn>,
    comm_finalize: Option<CommFn>,
    comm_get_async_error: Option<CommQueryFn>,
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
            comm_split: sym!(lib, "ncclCommSplit").ok(),
            comm_init_rank_config: sym!(lib, "ncclCommInitRankConfig").ok(),
            comm_abort: sym!(lib, "ncclCommAbort").ok(),
            comm_finalize: sym!(lib, "ncclCommFinalize").ok(),
            comm_get_async_error: sym!(lib, "ncclCommGetAsyncError").ok(),
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

    /// A call's return code on a comm that may be non-blocking: `Ok` if it
    /// was issued (`ncclSuccess` or `ncclInProgress`), else its error.
    ///
    /// Either way the caller polls the comm to success before it reads the
    /// call's outputs or makes its next call: on a non-blocking comm NCCL
    /// runs a grouped call (a window registration, a split, an all-reduce)
    /// on its own thread and may answer `ncclSuccess` while that thread
    /// still runs (its group end's `ncclInProgress` is dropped on the way
    /// out), writes the outputs from that thread, and refuses the comm's
    /// next call until `ncclCommGetAsyncError` answered success (NCCL 2.28.9
    /// on the H200: a registration answered success with a null window).
    /// On a blocking comm the poll answers success at once.
    fn issued(&self, call: &'static str, rc: c_int, comm: ncclComm_t) -> Result<(), BackendError> {
        if rc == NCCL_IN_PROGRESS {
            return Ok(());
        }
        self.result(call, rc, Some(comm))
    }

    /// `ncclCommGetAsyncError`: ready, in progress, or the comm's error.
    ///
    /// # Safety
    /// `comm` is a live comm of this process.
    pub(super) unsafe fn async_error(
        &self,
        comm: ncclComm_t,
    ) -> Result<CommProgress, BackendError> {
        let f = present(self.comm_get_async_error, "ncclCommGetAsyncError")?;
        let mut state: c_int = 0;
        // SAFETY: the caller's guarantee; valid out-pointer (ncclResult_t is
        // a C enum, int-sized).
        let rc = unsafe { f(comm, &mut state) };
        self.result("ncclCommGetAsyncError", rc, Some(comm))?;
        match state {
            0 => Ok(CommProgress::Ready),
            NCCL_IN_PROGRESS => Ok(CommProgress::InProgress),
            code => self
                .result("ncclCommGetAsyncError", code, Some(comm))
                .map(|()| CommProgress::Ready),
        }
    }

    /// Polls `comm` (`ncclCommGetAsyncError`) from the calling thread until
    /// the call that answered `ncclInProgress` completes, asking `wait`
    /// between polls. If `wait`'s action aborted the comm: `Timeout`, and
    /// the comm is not touched again.
    ///
    /// # Safety
    /// `comm` is a live comm of this process (it may be freed by `wait`'s
    /// action, after which it is not used).
    pub(super) unsafe fn wait_done(
        &self,
        call: &'static str,
        comm: ncclComm_t,
        wait: &Wait<'_>,
    ) -> Result<(), BackendError> {
        let mut backoff = Backoff::new();
        loop {
            // SAFETY: the caller's guarantee; not aborted yet (we return
            // right after an abort below).
            match unsafe { self.async_error(comm) }? {
                CommProgress::Ready => return Ok(()),
                CommProgress::InProgress => {}
            }
            if wait.check() == Some(AtDeadline::Aborted) {
                return Err(wait.timeout(call, RawComm(comm as usize)));
            }
            backoff.pause(wait);
        }
    }

    /// Polls a comm this process made itself (a split child, a
    /// non-blocking init) until it is ready; at `wait`'s deadline aborts it
    /// (it is ours) and answers `Timeout`. `wait`'s action is not run.
    ///
    /// # Safety
    /// `comm` is a live comm made by this process that nobody else uses.
    unsafe fn wait_own(
        &self,
        call: &'static str,
        comm: ncclComm_t,
        wait: &Wait<'_>,
    ) -> Result<(), BackendError> {
        let mut backoff = Backoff::new();
        loop {
            // SAFETY: the caller's guarantee.
            let progress = unsafe { self.async_error(comm) };
            match progress {
                Ok(CommProgress::Ready) => return Ok(()),
                Ok(CommProgress::InProgress) if wait.remaining() != Some(Default::default()) => {
                    backoff.pause(wait);
                }
                other => {
                    // SAFETY: ours, unused by anyone else; never used after.
                    let _ = unsafe { self.comm_abort(comm) };
                    return match other {
                        Err(e) => Err(e),
                        Ok(_) => Err(wait.timeout(call, RawComm(comm as usize))),
                    };
                }
            }
        }
    }

    /// `ncclCommSplit(parent, 0, key, &child, {blocking = 0})`, then the
    /// child polled until it is ready and the parent until its split
    /// answered success; at `wait`'s deadline the child (if NCCL handed it
    /// out) is aborted, and the parent is treated as any borrowed comm
    /// (`wait`'s action).
    ///
    /// NCCL writes the child's handle only when the split completes, and on
    /// a non-blocking parent that is after the call returns (NCCL 2.28.9 on
    /// the H200 answered `ncclSuccess` with the child still NULL): until
    /// the handle appears, the parent's `ncclCommGetAsyncError` tells the
    /// split's progress. The handle's slot is on the heap, because NCCL may
    /// write it later from its own thread; it is freed once the handle was
    /// read, and leaked (8 bytes, and a comm nobody destroys) if the
    /// deadline passes first.
    ///
    /// # Safety
    /// `parent` is a live comm of this process, used by no other thread
    /// during the call.
    pub(super) unsafe fn comm_split(
        &self,
        parent: ncclComm_t,
        key: c_int,
        wait: &Wait<'_>,
    ) -> Result<ncclComm_t, BackendError> {
        let f = present(self.comm_split, "ncclCommSplit")?;
        let mut config = nonblocking_config();
        let slot: *mut AtomicPtr<ncclComm> =
            Box::into_raw(Box::new(AtomicPtr::new(std::ptr::null_mut())));
        // SAFETY: just made; freed below only right before returning, after
        // the last use of `cell`.
        let cell = unsafe { &*slot };
        // SAFETY: the caller's guarantee for `parent`; `cell` is a valid,
        // heap-allocated `ncclComm_t` that outlives every write NCCL may
        // make to it (freed only after the handle was read, else leaked);
        // NCCL copies the config during the call.
        let rc = unsafe { f(parent, 0, key, cell.as_ptr(), &mut config) };
        // SAFETY: made by `Box::into_raw` above; NCCL writes it no more once
        // the handle was read or the call failed.
        let free_slot = || drop(unsafe { Box::from_raw(slot) });
        if let Err(e) = self.issued("ncclCommSplit", rc, parent) {
            free_slot();
            return Err(e);
        }
        let mut backoff = Backoff::new();
        loop {
            // Acquire: NCCL's write of the handle happens after it made the
            // child.
            let child = cell.load(Ordering::Acquire);
            if !child.is_null() {
                free_slot();
                // SAFETY: the child is ours and unused elsewhere.
                unsafe { self.wait_own("ncclCommSplit", child, wait) }?;
                // NCCL refuses the parent's next call until a poll of the
                // parent answered success, even after the child appeared
                // (NCCL 2.28.9 on the H200).
                // SAFETY: the caller's guarantee for `parent`.
                if let Err(e) = unsafe { self.wait_done("ncclCommSplit", parent, wait) } {
                    // SAFETY: ours, ready, unused by anyone else; never used
                    // after.
                    let _ = unsafe { self.comm_abort(child) };
                    return Err(e);
                }
                return Ok(child);
            }
            // An error of the parent ends the wait. Whether the parent says
            // "in progress" meanwhile is not documented, so "ready" does not
            // end it: with color 0 a child always comes, or an error, or the
            // deadline.
            // (On an error the slot is leaked: see the docs.)
            // SAFETY: the caller's guarantee for `parent`.
            unsafe { self.async_error(parent) }?;
            if wait.remaining() == Some(Default::default()) {
                return Err(wait.timeout("ncclCommSplit", RawComm(parent as usize)));
            }
            backoff.pause(wait);
        }
    }

    /// `ncclCommInitRankConfig` with `blocking = 0` on the current device,
    /// polled until ready (aborted at `wait`'s deadline).
    pub(super) fn comm_init_rank_nonblocking(
        &self,
        nranks: c_int,
        id: ncclUniqueId,
        rank: c_int,
        wait: &Wait<'_>,
    ) -> Result<ncclComm_t, BackendError> {
        let f = present(self.comm_init_rank_config, "ncclCommInitRankConfig")?;
        let mut config = nonblocking_config();
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer and config; the id is passed by value as
        // NCCL's prototype says; NCCL checks the rank against nranks.
        let rc = unsafe { f(&mut comm, nranks, id, rank, &mut config) };
        if rc != 0 && rc != NCCL_IN_PROGRESS {
            self.result("ncclCommInitRankConfig", rc, None)?;
        }
        if comm.is_null() {
            return Err(BackendError::Nccl {
                call: "ncclCommInitRankConfig",
                code: rc,
                message: "returned no comm".into(),
            });
        }
        if rc == NCCL_IN_PROGRESS {
            // SAFETY: just made, ours.
            unsafe { self.wait_own("ncclCommInitRankConfig", comm, wait) }?;
        }
        Ok(comm)
    }

    /// `ncclCommAbort`. NCCL frees the comm (and its windows) inside.
    ///
    /// # Safety
    /// `comm` is a live comm of this process; no other thread is inside a
    /// call on it unless the comm is non-blocking; never used afterwards.
    pub(super) unsafe fn comm_abort(&self, comm: ncclComm_t) -> Result<(), BackendError> {
        let f = present(self.comm_abort, "ncclCommAbort")?;
        // SAFETY: the caller's guarantee.
        let rc = unsafe { f(comm) };
        // `ncclInProgress` would ask us to poll a comm that is freed: the
        // abort is done as far as we may know.
        if rc == NCCL_IN_PROGRESS {
            return Ok(());
        }
        self.result("ncclCommAbort", rc, None)
    }

    /// `ncclCommFinalize` (polled; aborted at `wait`'s deadline) then
    /// `ncclCommDestroy`.
    ///
    /// # Safety
    /// `comm` is a live comm made by this process that no other thread
    /// uses; never used afterwards.
    pub(super) unsafe fn comm_finalize_destroy(
        &self,
        comm: ncclComm_t,
        wait: &Wait<'_>,
    ) -> Result<(), BackendError> {
        if let Some(finalize) = self.comm_finalize {
            // SAFETY: the caller's guarantee.
            let rc = unsafe { finalize(comm) };
            self.issued("ncclCommFinalize", rc, comm)?;
            // SAFETY: ours; aborted (and not used again) at the deadline.
            unsafe { self.wait_own("ncclCommFinalize", comm, wait) }?;
        }
        // SAFETY: the caller's guarantee; finalized (or no finalize).
        unsafe { self.comm_destroy(comm) }
    }

    /// `ncclCommWindowRegister` (collective); a null window means no
    /// symmetric support. Handles `ncclInProgress` (polled as `wait` says;
    /// the out-pointer stays valid until NCCL is done with it).
    ///
    /// # Safety
    /// `comm` is a live comm of this process; `[ptr, ptr + size)` is
    /// `ncclMemAlloc` memory.
    pub(super) unsafe fn window_register_within(
        &self,
        comm: ncclComm_t,
        ptr: *mut c_void,
        size: usize,
        flags: c_int,
        wait: &Wait<'_>,
    ) -> Result<ncclWindow_t, BackendError> {
        let mut win: ncclWindow_t = std::ptr::null_mut();
        // SAFETY: the caller's guarantee; valid out-pointer, which lives
        // until this function returns, after the call completed or the comm
        // was aborted (NCCL writes it no more either way).
        let rc = unsafe { (self.win_register)(comm, ptr, size, &mut win, flags) };
        self.issued("ncclCommWindowRegister", rc, comm)?;
        // SAFETY: the caller's guarantee.
        unsafe { self.wait_done("ncclCommWindowRegister", comm, wait) }?;
        Ok(win)
    }

    /// `ncclCommWindowDeregister`; handles `ncclInProgress`.
    ///
    /// # Safety
    /// `win` was returned by `ncclCommWindowRegister` on the live `comm`
    /// and is not deregistered yet.
    pub(super) unsafe fn window_deregister_within(
        &self,
        comm: ncclComm_t,
        win: ncclWindow_t,
        wait: &Wait<'_>,
    ) -> Result<(), BackendError> {
        // SAFETY: the caller's guarantee.
        let rc = unsafe { (self.win_deregister)(comm, win) };
        self.issued("ncclCommWindowDeregister", rc, comm)?;
        // SAFETY: the caller's guarantee.
        unsafe { self.wait_done("ncclCommWindowDeregister", comm, wait) }?;
        Ok(())
    }

    /// Enqueues `ncclAllReduce(buf, buf, count, ncclUint64, ncclMax)` on
    /// `stream`, polling the comm while NCCL answers `ncclInProgress`.
    ///
    /// # Safety
    /// `comm` is a live comm whose device is current; `buf` is device
    /// memory of it holding `count` u64; `stream` is a stream of it.
    pub(super) unsafe fn all_reduce_max_u64(
        &self,
        buf: *mut c_void,
        count: usize,
        comm: ncclComm_t,
        stream: cudaStream_t,
        wait: &Wait<'_>,
    ) -> Result<(), BackendError> {
        let f = present(self.all_reduce, "ncclAllReduce")?;
        // SAFETY: the caller's guarantee; in place.
        let rc = unsafe { f(buf, buf, count, UINT64, MAX, comm, stream) };
        self.issued("ncclAllReduce", rc, comm)?;
        // SAFETY: the caller's guarantee.
        unsafe { self.wait_done("ncclAllReduce", comm, wait) }?;
        Ok(())
    }

    /// `ncclCommUserRank`, or 0 if this NCCL lacks it.
    ///
    /// # Safety
    /// `comm` is a live comm of this process.
    pub(super) unsafe fn user_rank_or_zero(&self, comm: ncclComm_t) -> Result<i32, BackendError> {
        match self.comm_user_rank {
            // SAFETY: the caller's guarantee.
            Some(f) => unsafe { self.query(f, "ncclCommUserRank", comm) },
            None => Ok(0),
        }
    }
}
