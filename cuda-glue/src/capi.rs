//! The C ABI (`include/segment_registry.h`), for PyTorch's
//! `CUDAPluggableAllocator` + `MemPool` and for C/C++ callers.
//!
//! One process-wide allocator, created by [`segreg_init`] (real NCCL; an
//! error if CUDA or NCCL is missing or NCCL is older than 2.28) or by
//! [`segreg_init_sim`] (a one-rank simulated backend, for tests). Every
//! function catches bad input and reports it through its return value and
//! [`segreg_last_error`]; none unwinds into C.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

use crate::allocator::{Allocator, CommState};
use crate::backend::{Backend, RawComm};
use crate::real::RealBackend;
use crate::sim::SimWorld;
use crate::util::lock;

/// `cudaStream_t` as the C side passes it (unused: `ncclMemAlloc` and
/// `ncclMemFree` are synchronous).
pub type CudaStream = *mut c_void;

/// Figures returned by [`segreg_stats`] (`segreg_stats` in the header).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegregStats {
    /// Tracked segments.
    pub live_segments: u64,
    /// Bytes in tracked segments.
    pub live_bytes: u64,
    /// Successful allocations.
    pub allocs: u64,
    /// Failed allocations.
    pub alloc_failures: u64,
    /// Successful frees.
    pub frees: u64,
    /// Refused frees (null, unknown pointer, double free).
    pub bad_frees: u64,
    /// Registration passes run.
    pub passes: u64,
    /// Registrations that returned a window.
    pub windows_registered: u64,
    /// Registrations that returned a null window (no symmetric support).
    pub null_windows: u64,
    /// Registrations that failed.
    pub register_failures: u64,
    /// Windows deregistered.
    pub windows_deregistered: u64,
    /// Windows registered for live segments, all comms.
    pub windows_live: u64,
    /// Deregistrations queued behind a pass's call in flight.
    pub deregisters_deferred: u64,
    /// Windows handed back by passes (segment freed while held).
    pub handed_back: u64,
    /// Deregistrations that failed.
    pub deregister_failures: u64,
    /// Deregistrations failed and waiting for a retry.
    pub windows_stuck: u64,
    /// Freed segments whose memory is not yet returned.
    pub pending_frees: u64,
    /// Successful `ncclMemFree` calls.
    pub mem_frees: u64,
    /// Failed `ncclMemFree` calls.
    pub mem_free_failures: u64,
    /// Attached comms.
    pub comms_attached: u64,
    /// Attached comms marked failed.
    pub comms_failed: u64,
    /// Violations recorded by the simulated backend (0 for real NCCL).
    pub sim_violations: u64,
}

struct Global {
    alloc: Allocator<Box<dyn Backend>>,
    sim: Option<Arc<SimWorld>>,
}

static GLOBAL: OnceLock<Global> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(c));
}

/// Runs an API call: clears the thread's last error, turns `Err` (and a
/// panic, which would be a bug) into `fail` plus a last-error message.
fn api<R>(fail: R, f: impl FnOnce() -> Result<R, String>) -> R {
    LAST_ERROR.with(|e| *e.borrow_mut() = None);
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(msg)) => {
            set_error(&msg);
            fail
        }
        Err(_) => {
            set_error("internal error (panic caught at the C boundary)");
            fail
        }
    }
}

fn global() -> Result<&'static Global, String> {
    GLOBAL
        .get()
        .ok_or_else(|| "segment registry not initialized: call segreg_init first".to_string())
}

fn init_with(
    kind: &'static str,
    make: impl FnOnce() -> Result<Global, String>,
) -> Result<c_int, String> {
    let _serial = lock(&INIT);
    if let Some(g) = GLOBAL.get() {
        let have = g.alloc.backend().name();
        return if have == kind {
            Ok(0)
        } else {
            Err(format!("already initialized with the {have} backend"))
        };
    }
    let g = make()?;
    GLOBAL
        .set(g)
        .map_err(|_| "initialization raced".to_string())?;
    Ok(0)
}

fn comm_of(ptr: *mut c_void) -> Result<RawComm, String> {
    if ptr.is_null() {
        return Err("null communicator".into());
    }
    Ok(RawComm(ptr as usize))
}

fn clamp(n: usize) -> c_int {
    c_int::try_from(n).unwrap_or(c_int::MAX)
}

/// Initializes the process-wide allocator on real NCCL. Returns 0, or -1
/// (see [`segreg_last_error`]) if CUDA or NCCL is missing, NCCL is older
/// than 2.28, or another backend was chosen already. Calling it again after
/// success returns 0.
#[no_mangle]
pub extern "C" fn segreg_init() -> c_int {
    api(-1, || {
        init_with("nccl", || {
            let b = RealBackend::new().map_err(|e| e.to_string())?;
            Ok(Global {
                alloc: Allocator::new(Box::new(b) as Box<dyn Backend>),
                sim: None,
            })
        })
    })
}

/// Initializes the process-wide allocator on the simulated backend (one
/// rank; pointers are not dereferenceable). For tests. Returns 0 or -1.
#[no_mangle]
pub extern "C" fn segreg_init_sim() -> c_int {
    api(-1, || {
        init_with("sim", || {
            let world = SimWorld::new(1);
            let rank = world.rank(0).ok_or("no rank 0")?;
            Ok(Global {
                alloc: Allocator::new(Box::new(rank) as Box<dyn Backend>),
                sim: Some(world),
            })
        })
    })
}

/// The backend's name ("nccl" or "sim"), or null before initialization.
/// The string is static.
#[no_mangle]
pub extern "C" fn segreg_backend() -> *const c_char {
    api(std::ptr::null(), || {
        Ok(match global()?.alloc.backend().name() {
            "nccl" => c"nccl".as_ptr(),
            "sim" => c"sim".as_ptr(),
            _ => std::ptr::null(),
        })
    })
}

/// `CUDAPluggableAllocator` alloc: `ncclMemAlloc(size)` on `device`, then
/// track the segment. Returns null on failure. `stream` is unused.
#[no_mangle]
pub extern "C" fn segreg_alloc(size: usize, device: c_int, stream: CudaStream) -> *mut c_void {
    let _ = stream;
    api(std::ptr::null_mut(), || {
        let p = global()?
            .alloc
            .alloc(size, device)
            .map_err(|e| e.to_string())?;
        Ok(p as *mut c_void)
    })
}

/// `CUDAPluggableAllocator` free: untrack, deregister every window (or
/// queue it to a pass in flight), then `ncclMemFree` once nothing covers
/// the memory. A null, unknown or already freed pointer is refused (last
/// error set, nothing changed). `size`, `device` and `stream` are unused.
#[no_mangle]
pub extern "C" fn segreg_free(ptr: *mut c_void, size: usize, device: c_int, stream: CudaStream) {
    let _ = (size, device, stream);
    api((), || {
        global()?
            .alloc
            .free(ptr as usize)
            .map(drop)
            .map_err(|e| e.to_string())
    });
}

/// Attaches a raw `ncclComm_t`. Returns its id (> 0, never reused), or -1
/// (null, already attached, not initialized).
#[no_mangle]
pub extern "C" fn segreg_attach(comm: *mut c_void) -> i64 {
    api(-1, || {
        let raw = comm_of(comm)?;
        let id = global()?.alloc.attach(raw).map_err(|e| e.to_string())?;
        i64::try_from(id.0).map_err(|_| "comm id overflow".to_string())
    })
}

/// Registers with the attached comm every live segment it has not seen
/// (collective: call it at the same point on every rank). Returns the
/// number of segments registered, or -1 (unknown comm, comm failed, or the
/// registration failed, which marks the comm failed: detach it).
#[no_mangle]
pub extern "C" fn segreg_register(comm: *mut c_void) -> c_int {
    api(-1, || {
        let raw = comm_of(comm)?;
        let g = global()?;
        let id = g
            .alloc
            .comm_id(raw)
            .ok_or_else(|| format!("{raw:?} is not attached"))?;
        let s = g.alloc.register(id).map_err(|e| e.to_string())?;
        Ok(clamp(s.registered.len()))
    })
}

/// Runs a pass for every attached comm, in attach order. Returns the total
/// number of segments registered, or -1 if any comm's pass failed (the
/// others still ran; the last error names the failures).
#[no_mangle]
pub extern "C" fn segreg_register_all() -> c_int {
    api(-1, || {
        let g = global()?;
        let mut total = 0usize;
        let mut errors = Vec::new();
        for (id, r) in g.alloc.register_all() {
            match r {
                Ok(s) => total += s.registered.len(),
                Err(e) => errors.push(format!("{id}: {e}")),
            }
        }
        if errors.is_empty() {
            Ok(clamp(total))
        } else {
            Err(errors.join("; "))
        }
    })
}

/// Detaches the comm: deregisters every window it holds. Call it before
/// destroying the comm. Returns the number of windows deregistered, or -1
/// (unknown comm, or some deregistrations failed: call it again).
#[no_mangle]
pub extern "C" fn segreg_detach(comm: *mut c_void) -> c_int {
    api(-1, || {
        let raw = comm_of(comm)?;
        let g = global()?;
        let id = g
            .alloc
            .comm_id(raw)
            .ok_or_else(|| format!("{raw:?} is not attached"))?;
        let r = g.alloc.detach(id).map_err(|e| e.to_string())?;
        Ok(clamp(r.deregistered))
    })
}

/// Fills `*out` (of `size` bytes, which must be `sizeof(segreg_stats)`).
/// Returns 0 or -1.
///
/// # Safety
/// `out` must be null or point to `size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn segreg_stats(out: *mut SegregStats, size: usize) -> c_int {
    api(-1, || {
        if out.is_null() {
            return Err("null stats pointer".into());
        }
        if size != std::mem::size_of::<SegregStats>() {
            return Err(format!(
                "stats size {size} does not match this library's {}",
                std::mem::size_of::<SegregStats>()
            ));
        }
        let g = global()?;
        let s = g.alloc.stats();
        let n = |v: usize| v as u64;
        let value = SegregStats {
            live_segments: n(s.live_segments),
            live_bytes: n(s.live_bytes),
            allocs: s.allocs,
            alloc_failures: s.alloc_failures,
            frees: s.frees,
            bad_frees: s.bad_frees,
            passes: s.passes,
            windows_registered: s.windows_registered,
            null_windows: s.null_windows,
            register_failures: s.register_failures,
            windows_deregistered: s.windows_deregistered,
            windows_live: s.comms.iter().map(|c| n(c.windows)).sum(),
            deregisters_deferred: s.deregisters_deferred,
            handed_back: s.handed_back,
            deregister_failures: s.deregister_failures,
            windows_stuck: n(s.windows_stuck),
            pending_frees: s.pending_frees,
            mem_frees: s.mem_frees,
            mem_free_failures: s.mem_free_failures,
            comms_attached: n(s.comms.len()),
            comms_failed: n(s
                .comms
                .iter()
                .filter(|c| c.state == CommState::Failed)
                .count()),
            sim_violations: g.sim.as_ref().map_or(0, |w| n(w.violations().len())),
        };
        // SAFETY: non-null, and the caller guarantees `size` (checked equal
        // to the struct's size) writable bytes; unaligned write to be safe
        // with any caller buffer.
        unsafe { out.write_unaligned(value) };
        Ok(0)
    })
}

/// The message of the last failed call on this thread, or null if the last
/// call on this thread succeeded. Valid until the thread's next call.
#[no_mangle]
pub extern "C" fn segreg_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ref().map_or(std::ptr::null(), |c| c.as_ptr()))
}

/// Sim backend only: creates a one-rank simulated comm and returns its raw
/// handle (null on error). Handle values are reused after destroy, like
/// `ncclComm_t` addresses.
#[no_mangle]
pub extern "C" fn segreg_sim_comm_create() -> *mut c_void {
    api(std::ptr::null_mut(), || {
        let w = sim_world()?;
        let c = w.comm_create(&[0]).map_err(|e| e.to_string())?;
        Ok(c.first()
            .map_or(std::ptr::null_mut(), |c| c.0 as *mut c_void))
    })
}

/// Sim backend only: destroys a simulated comm (violations are recorded if
/// windows are still registered on it). Returns 0 or -1.
#[no_mangle]
pub extern "C" fn segreg_sim_comm_destroy(comm: *mut c_void) -> c_int {
    api(-1, || {
        let raw = comm_of(comm)?;
        sim_world()?.comm_destroy(raw).map_err(|e| e.to_string())?;
        Ok(0)
    })
}

/// Sim backend only: the number of NCCL rule violations recorded (after
/// the end-of-run checks), or -1.
#[no_mangle]
pub extern "C" fn segreg_sim_violations() -> i64 {
    api(-1, || {
        let n = sim_world()?.verify().len();
        i64::try_from(n).map_err(|_| "overflow".to_string())
    })
}

fn sim_world() -> Result<&'static Arc<SimWorld>, String> {
    global()?
        .sim
        .as_ref()
        .ok_or_else(|| "not the simulated backend".to_string())
}
