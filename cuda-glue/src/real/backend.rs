//! [`RealBackend`]: the [`Backend`] on NCCL and the CUDA driver.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaContext;
use cudarc::nccl::sys::{ncclComm_t, ncclWindow_t};

use super::agreement::Scratch;
use super::api::NcclApi;
use super::context::{driver, Contexts};
use crate::backend::{Backend, BackendError, CommProgress, RawComm, Wait, Window};
use crate::util::lock;

/// The real NCCL backend.
pub struct RealBackend {
    pub(super) api: NcclApi,
    version: i32,
    pub(super) contexts: Contexts,
    /// Device of every pointer this backend allocated and has not freed.
    devices: Mutex<HashMap<usize, i32>>,
    next_generation: AtomicU64,
    /// The agreement's buffer and stream of each comm set up for it.
    pub(super) scratch: Mutex<HashMap<usize, Scratch>>,
}

impl std::fmt::Debug for RealBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealBackend")
            .field("nccl_version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The raw comm of a call, refusing a null one (NCCL 2.28 segfaults on it).
pub(super) fn live_comm(comm: RawComm, call: &'static str) -> Result<ncclComm_t, BackendError> {
    if comm.is_null() {
        return Err(BackendError::NullComm { call });
    }
    Ok(comm.0 as ncclComm_t)
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
        driver("cuInit", cudarc::driver::result::init)?;
        Ok(RealBackend {
            api,
            version,
            contexts: Contexts::default(),
            devices: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
            scratch: Mutex::new(HashMap::new()),
        })
    }

    /// `ncclGetVersion` (e.g. 22809 for 2.28.9).
    pub fn nccl_version(&self) -> i32 {
        self.version
    }

    /// The version NCCL reports now (re-read; for diagnostics).
    pub fn read_version(&self) -> Result<i32, BackendError> {
        self.api.version()
    }

    /// Number of CUDA devices.
    pub fn device_count(&self) -> Result<i32, BackendError> {
        driver("cuDeviceGetCount", CudaContext::device_count)
    }

    /// Binds `device`'s primary context to the calling thread and leaves it
    /// bound (for callers that then use the CUDA driver or NCCL directly,
    /// like the GPU tests). The backend's own calls never need this: they
    /// bind for the call and restore the thread's context afterwards.
    pub fn bind_device(&self, device: i32) -> Result<Arc<CudaContext>, BackendError> {
        let ctx = self.contexts.get(device)?;
        driver("cuCtxSetCurrent", || ctx.bind_to_thread())?;
        Ok(ctx)
    }

    /// `(free, total)` device memory (`cuMemGetInfo`) on `device`.
    pub fn mem_get_info(&self, device: i32) -> Result<(usize, usize), BackendError> {
        self.contexts.on_device(device, || {
            driver("cuMemGetInfo", cudarc::driver::result::mem_get_info)
        })
    }

    /// Runs `f` on the comm's device (see `Contexts::on_device`), or as is
    /// when NCCL cannot say which device that is.
    ///
    /// # Safety
    /// `comm` is a live comm of this process.
    pub(super) unsafe fn on_comm_device<T>(
        &self,
        comm: ncclComm_t,
        f: impl FnOnce() -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        // SAFETY: the caller's guarantee.
        match unsafe { self.api.comm_cu_device(comm) }? {
            Some(dev) => self.contexts.on_device(dev, f),
            None => f(),
        }
    }

    /// Creates a one-rank communicator on `device` (`ncclGetUniqueId` +
    /// `ncclCommInitRank`), for the demo and the GPU tests.
    pub fn comm_init_one_rank(&self, device: i32) -> Result<RawComm, BackendError> {
        self.contexts.on_device(device, || {
            let id = self.api.unique_id()?;
            Ok(RawComm(self.api.comm_init_rank(1, id, 0)? as usize))
        })
    }

    /// Creates a one-rank *non-blocking* communicator on `device`
    /// (`ncclCommInitRankConfig` with `blocking = 0`), polled until ready
    /// or until `wait`'s deadline (then aborted): a comm the caller owns,
    /// which the allocator may abort at a deadline (attach it with
    /// [`AttachOptions::owned`](crate::AttachOptions::owned)).
    pub fn comm_init_one_rank_nonblocking(
        &self,
        device: i32,
        wait: &Wait<'_>,
    ) -> Result<RawComm, BackendError> {
        self.contexts.on_device(device, || {
            let id = self.api.unique_id()?;
            let c = self.api.comm_init_rank_nonblocking(1, id, 0, wait)?;
            Ok(RawComm(c as usize))
        })
    }

    /// `ncclCommDestroy`. Detach the comm from every allocator first.
    ///
    /// # Safety
    /// `comm` must be a live comm that no other thread uses, and it must not
    /// be used afterwards.
    pub unsafe fn comm_destroy(&self, comm: RawComm) -> Result<(), BackendError> {
        let c = live_comm(comm, "ncclCommDestroy")?;
        // SAFETY: the caller guarantees a live, unshared comm.
        unsafe { self.api.comm_destroy(c) }
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
        let ptr = self
            .contexts
            .on_device(device, || self.api.mem_alloc(size))?;
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
        let freed = self.contexts.on_device(device, || {
            // SAFETY: `ptr` came from ncclMemAlloc and was not freed (it was
            // in `devices`, and only this call took it out); the allocator
            // deregistered every window over it.
            unsafe { self.api.mem_free(ptr as *mut c_void) }
        });
        if freed.is_err() {
            // NCCL kept the memory, so no alloc can have the address: the
            // entry goes back for a retry.
            lock(&self.devices).insert(ptr, device);
        }
        freed
    }

    fn nccl_version(&self) -> i32 {
        self.version
    }

    fn comm_window_register_within(
        &self,
        comm: RawComm,
        ptr: usize,
        size: usize,
        flags: i32,
        wait: &Wait<'_>,
    ) -> Result<Option<Window>, BackendError> {
        let c = live_comm(comm, "ncclCommWindowRegister")?;
        if ptr == 0 || size == 0 {
            return Err(BackendError::InvalidArgument {
                call: "ncclCommWindowRegister",
                reason: format!("buffer {ptr:#x} of {size} bytes"),
            });
        }
        let register = || {
            // SAFETY: non-null comm the caller attached (a live
            // ncclComm_t); the buffer is ncclMemAlloc memory of `size` bytes.
            unsafe {
                self.api
                    .window_register_within(c, ptr as *mut c_void, size, flags, wait)
            }
        };
        // SAFETY: as above, a live comm.
        let win = unsafe { self.on_comm_device(c, register) }?;
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

    fn comm_window_deregister_within(
        &self,
        comm: RawComm,
        window: Window,
        wait: &Wait<'_>,
    ) -> Result<(), BackendError> {
        let c = live_comm(comm, "ncclCommWindowDeregister")?;
        if window.raw == 0 {
            return Err(BackendError::InvalidArgument {
                call: "ncclCommWindowDeregister",
                reason: "null window".into(),
            });
        }
        let deregister = || {
            // SAFETY: the window was returned by ncclCommWindowRegister on
            // this live comm and is deregistered exactly once (the registry
            // hands each window back once).
            unsafe {
                self.api
                    .window_deregister_within(c, window.raw as ncclWindow_t, wait)
            }
        };
        // SAFETY: a live comm the caller attached.
        unsafe { self.on_comm_device(c, deregister) }
    }

    fn comm_split(&self, parent: RawComm, wait: &Wait<'_>) -> Result<RawComm, BackendError> {
        let p = live_comm(parent, "ncclCommSplit")?;
        let split = || {
            // SAFETY: a live comm the caller attached; the caller makes no
            // other call on it meanwhile (attach is at a program point of
            // the comm's own thread).
            let key = unsafe { self.api.user_rank_or_zero(p) }?;
            // SAFETY: as above.
            let child = unsafe { self.api.comm_split(p, key, wait) }?;
            Ok(RawComm(child as usize))
        };
        // SAFETY: as above, a live comm.
        unsafe { self.on_comm_device(p, split) }
    }

    fn comm_async_error(&self, comm: RawComm) -> Result<CommProgress, BackendError> {
        let c = live_comm(comm, "ncclCommGetAsyncError")?;
        // SAFETY: a live comm the caller attached (or made).
        unsafe { self.api.async_error(c) }
    }

    fn comm_abort(&self, comm: RawComm) -> Result<(), BackendError> {
        let c = live_comm(comm, "ncclCommAbort")?;
        // SAFETY: the allocator aborts only comms it may abort (its own, or
        // a non-blocking one whose call it is polling itself), and never
        // uses the handle again.
        unsafe { self.api.comm_abort(c) }
    }

    fn comm_release(&self, comm: RawComm, wait: &Wait<'_>) -> Result<(), BackendError> {
        let c = live_comm(comm, "ncclCommDestroy")?;
        // SAFETY: a comm the glue made (the agreement comm), used by no
        // other thread, never used after.
        unsafe { self.api.comm_finalize_destroy(c, wait) }
    }

    fn all_reduce_setup(&self, comm: RawComm) -> Result<(), BackendError> {
        self.agreement_setup(comm)
    }

    fn all_reduce_max_u64(
        &self,
        comm: RawComm,
        words: &mut [u64],
        wait: &Wait<'_>,
    ) -> Result<(), BackendError> {
        self.agreement_all_reduce(comm, words, wait)
    }

    fn all_reduce_teardown(&self, comm: RawComm) {
        self.agreement_teardown(comm);
    }
}
