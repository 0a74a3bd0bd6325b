//! The C ABI (`include/segment_registry.h`), for PyTorch's
//! `CUDAPluggableAllocator` + `MemPool` and for C/C++ callers.
//!
//! One process-wide allocator, created by [`segreg_init`] (real NCCL; an
//! error if CUDA or NCCL is missing or NCCL is older than 2.28) or by
//! [`segreg_init_sim`] (a one-rank simulated backend, for tests). Every
//! function catches bad input and reports it through its return value and
//! [`segreg_last_error`]; none unwinds into C or aborts, also when called
//! after the calling thread's thread-locals are gone (from a pthread-key
//! destructor, an `atexit` handler or a C++ static destructor, where
//! PyTorch frees its pools at exit): such a call works as always, only its
//! error message is not kept (see [`segreg_last_error`]).
//!
//! [`segreg_window_get`] is the lookup a kernel launcher calls per tensor
//! (HCCL's `HcclCommSymWinGet`): lock-free on success, with one error code
//! per answer (`SEGREG_ERR_*`).

mod boundary;

use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, Mutex, OnceLock};

use segment_registry::{CommId, WindowLookupError};

use boundary::{api, api_coded, last_error_ptr};

use crate::allocator::{Allocator, WindowError};
use crate::backend::{Backend, RawComm};
use crate::real::RealBackend;
use crate::sim::SimWorld;
pub use crate::stats::SegregStats;
use crate::util::lock;

/// `cudaStream_t` as the C side passes it (unused: `ncclMemAlloc` and
/// `ncclMemFree` are synchronous).
pub type CudaStream = *mut c_void;

/// [`segreg_window_get`]: found; `*win` and `*offset` are set.
pub const SEGREG_OK: c_int = 0;
/// [`segreg_window_get`]: bad input (a null `win` or `offset`, a null comm)
/// or the library is not initialized.
pub const SEGREG_ERR_INVALID: c_int = -1;
/// [`segreg_window_get`]: the comm is not attached (never, or detached).
pub const SEGREG_ERR_NOT_ATTACHED: c_int = -2;
/// [`segreg_window_get`]: no live allocation contains `ptr` (unknown
/// pointer, or its allocation was freed).
pub const SEGREG_ERR_NOT_TRACKED: c_int = -3;
/// [`segreg_window_get`]: `[ptr, ptr + size)` runs past the end of the
/// allocation that contains `ptr`.
pub const SEGREG_ERR_CROSSES_END: c_int = -4;
/// [`segreg_window_get`]: the allocation is not registered with this comm
/// yet (run `segreg_register` on every rank first).
pub const SEGREG_ERR_NOT_REGISTERED: c_int = -5;
/// [`segreg_window_get`]: registered without a window: the comm has no
/// symmetric-memory support.
pub const SEGREG_ERR_NO_WINDOW: c_int = -6;
/// [`segreg_window_get`]: internal error (a bug; see the last error).
pub const SEGREG_ERR_INTERNAL: c_int = -7;

struct Global {
    alloc: Allocator<Box<dyn Backend>>,
    sim: Option<Arc<SimWorld>>,
}

static GLOBAL: OnceLock<Global> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

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

/// The allocator and the id of the attached raw comm `comm`.
fn attached(comm: *mut c_void) -> Result<(&'static Global, CommId), String> {
    let raw = comm_of(comm)?;
    let g = global()?;
    let id = g
        .alloc
        .comm_id(raw)
        .ok_or_else(|| format!("{raw:?} is not attached"))?;
    Ok((g, id))
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
        let (g, id) = attached(comm)?;
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
        let (g, id) = attached(comm)?;
        let r = g.alloc.detach(id).map_err(|e| e.to_string())?;
        Ok(clamp(r.deregistered))
    })
}

/// The C answer to a failed lookup: its `SEGREG_ERR_*` code, and a message
/// that says what the code means (the header's words) and then what the
/// lookup found.
fn lookup_failure(e: &WindowError) -> (c_int, String) {
    use WindowLookupError as L;
    let (code, meaning) = match e {
        WindowError::UnknownComm(_) | WindowError::Lookup(L::NotAttached(_)) => (
            SEGREG_ERR_NOT_ATTACHED,
            "comm not attached (never, or detached)",
        ),
        WindowError::Lookup(L::NotTracked { .. }) => (
            SEGREG_ERR_NOT_TRACKED,
            "no live allocation contains ptr (or freed)",
        ),
        WindowError::Lookup(L::CrossesEnd { .. }) => (
            SEGREG_ERR_CROSSES_END,
            "[ptr, ptr+size) runs past its allocation",
        ),
        WindowError::Lookup(L::NotRegistered { .. }) => (
            SEGREG_ERR_NOT_REGISTERED,
            "not registered with comm yet: run segreg_register",
        ),
        WindowError::Lookup(L::NoWindow { .. }) => (
            SEGREG_ERR_NO_WINDOW,
            "registered, null window: no symmetric support",
        ),
    };
    (code, format!("{meaning}: {e}"))
}

/// The window registered with the attached comm for the allocation that
/// contains `[ptr, ptr + size)`, and the offset of `ptr` in it (shaped like
/// HCCL's `HcclCommSymWinGet`). With them a kernel addresses the tensor
/// through NCCL's device API: `ncclGetLocalPointer(win, offset)`.
///
/// Returns [`SEGREG_OK`] and sets `*win` (the `ncclWindow_t`) and `*offset`;
/// else a negative `SEGREG_ERR_*` code, sets `*win` to null and `*offset`
/// to 0 (those that are non-null), and sets the last error. `size` may be
/// 0. Lock-free on success (no lock, no NCCL call); thread-safe.
///
/// # Safety
/// `win` and `offset` must each be null (refused with
/// [`SEGREG_ERR_INVALID`]) or valid for a write of their type.
#[no_mangle]
pub unsafe extern "C" fn segreg_window_get(
    comm: *mut c_void,
    ptr: *mut c_void,
    size: usize,
    win: *mut *mut c_void,
    offset: *mut usize,
) -> c_int {
    let invalid = |msg: String| ((SEGREG_ERR_INVALID, (0, 0)), msg);
    let (code, value) = api_coded((SEGREG_ERR_INTERNAL, (0, 0)), || {
        if win.is_null() || offset.is_null() {
            return Err(invalid("null output pointer (win or offset)".into()));
        }
        let raw = comm_of(comm).map_err(invalid)?;
        let hit = global()
            .map_err(invalid)?
            .alloc
            .window_of_raw(raw, ptr as usize, size)
            .map_err(|e| {
                let (code, msg) = lookup_failure(&e);
                ((code, (0, 0)), msg)
            })?;
        Ok((SEGREG_OK, (hit.window.raw, hit.offset)))
    });
    if !win.is_null() {
        // SAFETY: non-null, and the caller guarantees it is valid for a
        // write of a pointer; unaligned write to accept any caller buffer.
        unsafe { win.write_unaligned(value.0 as *mut c_void) };
    }
    if !offset.is_null() {
        // SAFETY: as above, for a `size_t`.
        unsafe { offset.write_unaligned(value.1) };
    }
    code
}

/// Fills `*out` (of `size` bytes, which must be `sizeof(segreg_stats_t)`).
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
        let sim_violations = g.sim.as_ref().map_or(0, |w| w.violations().len());
        let value = SegregStats::from_stats(&g.alloc.stats(), sim_violations as u64);
        // SAFETY: non-null, and the caller guarantees `size` (checked equal
        // to the struct's size) writable bytes; unaligned write to be safe
        // with any caller buffer.
        unsafe { out.write_unaligned(value) };
        Ok(0)
    })
}

/// The message of the last failed call on this thread, or null if the last
/// call on this thread succeeded. Valid until the thread's next call.
///
/// Once the thread's thread-locals are destroyed (a call from a
/// pthread-key destructor, an `atexit` handler or a C++ static destructor,
/// where glibc has already destroyed them), no message is kept: it returns
/// a static message saying so, whether or not the last call failed; the
/// calls themselves work as always and their return values still tell.
#[no_mangle]
pub extern "C" fn segreg_last_error() -> *const c_char {
    last_error_ptr()
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

/// Sim backend only: like [`segreg_sim_comm_create`], for a comm without
/// symmetric support: its registrations succeed with a null window (as on
/// NCCL 2.29+), so [`segreg_window_get`] answers [`SEGREG_ERR_NO_WINDOW`].
#[no_mangle]
pub extern "C" fn segreg_sim_comm_create_nosym() -> *mut c_void {
    api(std::ptr::null_mut(), || {
        let w = sim_world()?;
        let c = w
            .comm_create_without_symmetric(&[0])
            .map_err(|e| e.to_string())?;
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
