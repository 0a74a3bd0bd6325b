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
//!
//! Checked comms and deadlines (`NEVER_HANG.md`): [`segreg_attach_checked`]
//! and [`segreg_attach_nonblocking`] attach a comm whose passes agree
//! before they register and whose calls end by a deadline;
//! [`segreg_register_status`] and [`segreg_abstain`] answer with one code
//! per outcome. The functions that existed before keep their behaviour.

mod boundary;
mod exports;
mod global;
mod one_state;

pub use global::{
    global_allocator, global_sim_world, init, BackendKind, GlobalAllocator, InitError,
};
pub use one_state::{state_probe, STATE_PROBE_SYMBOL};

/// Every C entry point of the header, by name (what
/// [`export_c_abi!`](crate::export_c_abi) exports, the probe aside).
pub const ENTRY_POINTS: &[&str] = crate::__segreg_entry_points!(__segreg_entry_point_names);

use std::ffi::{c_char, c_int, c_void};

use segment_registry::{CommId, WindowLookupError};

use boundary::{api, api_coded, last_error_ptr};

use crate::allocator::{AbortHook, AttachOptions, WindowError};
use crate::backend::{Backend, RawComm};
use crate::error::RegisterError;
pub use crate::stats::SegregStats;

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
/// [`segreg_register_status`], [`segreg_abstain`]: a checked pass found
/// that the ranks disagree (or one abstained): nothing was registered on
/// any rank, the comm is healthy; the last error says what differs.
pub const SEGREG_ERR_DIVERGED: c_int = -8;
/// [`segreg_register_status`]: a registration reached the comm's deadline
/// and the comm was aborted (its windows are gone): detach it.
pub const SEGREG_ERR_TIMEOUT: c_int = -9;
/// [`segreg_register_status`], [`segreg_abstain`]: the comm was aborted
/// earlier: detach it.
pub const SEGREG_ERR_ABORTED: c_int = -10;
/// [`segreg_register_status`], [`segreg_abstain`]: the comm is failed (a
/// registration failed, now or before): only detach is allowed.
pub const SEGREG_ERR_FAILED: c_int = -11;
/// [`segreg_register_status`], [`segreg_abstain`]: a pass already runs on
/// the comm (on another thread).
pub const SEGREG_ERR_BUSY: c_int = -12;
/// [`segreg_register_status`], [`segreg_abstain`]: a checked pass's
/// agreement failed or reached its deadline: nothing was registered and
/// the comm is failed now.
pub const SEGREG_ERR_AGREEMENT: c_int = -13;
/// [`segreg_abstain`]: the comm was not attached checked.
pub const SEGREG_ERR_NOT_CHECKED: c_int = -14;

/// The owner's abort of a borrowed non-blocking comm, given to
/// [`segreg_attach_nonblocking`]: called with the raw comm and the `ctx`
/// given there, by the thread whose call on the comm reached its deadline
/// (a thread inside `segreg_register`, `segreg_free` or `segreg_detach`).
/// Returns 0 once the comm is aborted (`ncclCommAbort`); anything else
/// means it is not, and the call goes on waiting (the stall is reported).
pub type SegregAbortFn = unsafe extern "C" fn(comm: *mut c_void, ctx: *mut c_void) -> c_int;

/// The deadline a C caller asks for: positive milliseconds, else the
/// environment's (`SEGREG_DEADLINE_MS`) or the default.
fn deadline_of(ms: i64) -> Option<std::time::Duration> {
    u64::try_from(ms)
        .ok()
        .filter(|&m| m > 0)
        .map(std::time::Duration::from_millis)
}

/// The C answer of a failed pass: its `SEGREG_ERR_*` code.
fn register_code(e: &RegisterError) -> c_int {
    match e {
        RegisterError::NotAttached(_) => SEGREG_ERR_NOT_ATTACHED,
        RegisterError::Busy(_) => SEGREG_ERR_BUSY,
        RegisterError::Failed { .. } | RegisterError::Register { .. } => SEGREG_ERR_FAILED,
        RegisterError::Diverged(_) => SEGREG_ERR_DIVERGED,
        RegisterError::Agreement { .. } => SEGREG_ERR_AGREEMENT,
        RegisterError::Timeout { .. } => SEGREG_ERR_TIMEOUT,
        RegisterError::Aborted { .. } => SEGREG_ERR_ABORTED,
        RegisterError::NotChecked(_) => SEGREG_ERR_NOT_CHECKED,
    }
}

/// A C caller's `ctx`, carried to the abort hook's thread.
struct Ctx(usize);

fn comm_of(ptr: *mut c_void) -> Result<RawComm, String> {
    if ptr.is_null() {
        return Err("null communicator".into());
    }
    Ok(RawComm(ptr as usize))
}

/// The allocator and the id of the attached raw comm `comm` (or of the
/// aborted comm that had the handle, not detached yet, if no live one has
/// it: so that its passes answer "aborted" and it can be detached).
fn attached(comm: *mut c_void) -> Result<(&'static GlobalAllocator, CommId), String> {
    let raw = comm_of(comm)?;
    let g = global_allocator()?;
    let id = g
        .comm_id_or_aborted(raw)
        .ok_or_else(|| format!("{raw:?} is not attached"))?;
    Ok((g, id))
}

/// Attaches `comm` with `opts`; the id or the error's words.
fn attach_with(comm: *mut c_void, opts: AttachOptions) -> Result<i64, String> {
    let raw = comm_of(comm)?;
    let id = global_allocator()?
        .attach_with(raw, opts)
        .map_err(|e| e.to_string())?;
    i64::try_from(id.0).map_err(|_| "comm id overflow".to_string())
}

fn clamp(n: usize) -> c_int {
    c_int::try_from(n).unwrap_or(c_int::MAX)
}

/// Initializes the process-wide allocator on real NCCL. Returns 0, or -1
/// (see [`segreg_last_error`]) if CUDA or NCCL is missing, NCCL is older
/// than 2.28, or another backend was chosen already. Calling it again after
/// success returns 0.
pub extern "C" fn segreg_init() -> c_int {
    api(-1, || {
        global::init(BackendKind::Nccl)
            .map(|_| 0)
            .map_err(|e| e.to_string())
    })
}

/// Initializes the process-wide allocator on the simulated backend (one
/// rank; pointers are not dereferenceable). For tests. Returns 0 or -1.
pub extern "C" fn segreg_init_sim() -> c_int {
    api(-1, || {
        global::init(BackendKind::Sim)
            .map(|_| 0)
            .map_err(|e| e.to_string())
    })
}

/// The backend's name ("nccl" or "sim"), or null before initialization.
/// The string is static.
pub extern "C" fn segreg_backend() -> *const c_char {
    api(std::ptr::null(), || {
        Ok(match global_allocator()?.backend().name() {
            "nccl" => c"nccl".as_ptr(),
            "sim" => c"sim".as_ptr(),
            _ => std::ptr::null(),
        })
    })
}

/// `CUDAPluggableAllocator` alloc: `ncclMemAlloc(size)` on `device`, then
/// track the segment. Returns null on failure. `stream` is unused.
pub extern "C" fn segreg_alloc(size: usize, device: c_int, stream: CudaStream) -> *mut c_void {
    let _ = stream;
    api(std::ptr::null_mut(), || {
        let p = global_allocator()?
            .alloc(size, device)
            .map_err(|e| e.to_string())?;
        Ok(p as *mut c_void)
    })
}

/// `CUDAPluggableAllocator` free: untrack, deregister every window (or
/// queue it to a pass in flight), then `ncclMemFree` once nothing covers
/// the memory. A null, unknown or already freed pointer is refused (last
/// error set, nothing changed). `size`, `device` and `stream` are unused.
pub extern "C" fn segreg_free(ptr: *mut c_void, size: usize, device: c_int, stream: CudaStream) {
    let _ = (size, device, stream);
    api((), || {
        global_allocator()?
            .free(ptr as usize)
            .map(drop)
            .map_err(|e| e.to_string())
    });
}

/// Attaches a raw `ncclComm_t`. Returns its id (> 0, never reused), or -1
/// (null, already attached, not initialized).
pub extern "C" fn segreg_attach(comm: *mut c_void) -> i64 {
    api(-1, || {
        let raw = comm_of(comm)?;
        let id = global_allocator()?.attach(raw).map_err(|e| e.to_string())?;
        i64::try_from(id.0).map_err(|_| "comm id overflow".to_string())
    })
}

/// Attaches a raw `ncclComm_t` *checked*, as borrowed and blocking (a
/// PyTorch comm): its passes agree before they register, over a private
/// comm split from it here (so this is a collective: call it at the same
/// point on every rank, on the thread that issues the comm's collectives).
/// `deadline_ms` > 0 bounds every collective call on it (else
/// `SEGREG_DEADLINE_MS`, else 10 minutes); a blocking comm is never
/// aborted: a call past its deadline is reported. Returns the id, or -1.
pub extern "C" fn segreg_attach_checked(comm: *mut c_void, deadline_ms: i64) -> i64 {
    api(-1, || {
        let mut opts = AttachOptions::new().checked();
        if let Some(d) = deadline_of(deadline_ms) {
            opts = opts.deadline(d);
        }
        attach_with(comm, opts)
    })
}

/// Attaches the application's *non-blocking* raw `ncclComm_t` (made with
/// `ncclConfig_t.blocking = 0`), checked if `checked` is non-zero. Every
/// call on it is polled by the calling thread; at its deadline
/// (`deadline_ms` > 0, else `SEGREG_DEADLINE_MS`, else 10 minutes) that
/// thread calls `abort(comm, ctx)` (never `ncclCommAbort` itself) and the
/// comm is treated as gone: the call answers [`SEGREG_ERR_TIMEOUT`], later
/// passes [`SEGREG_ERR_ABORTED`], and its windows leave the accounting
/// without NCCL calls. Returns the id, or -1 (also for a null `abort`).
///
/// # Safety
/// `abort` must be callable from any thread with `comm` and `ctx` until
/// the comm is detached, and must not unwind.
pub unsafe extern "C" fn segreg_attach_nonblocking(
    comm: *mut c_void,
    checked: c_int,
    deadline_ms: i64,
    abort: Option<SegregAbortFn>,
    ctx: *mut c_void,
) -> i64 {
    api(-1, || {
        let f = abort.ok_or("a non-blocking comm needs its owner's abort hook")?;
        let ctx = Ctx(ctx as usize);
        let hook: AbortHook = std::sync::Arc::new(move |raw: RawComm| {
            // SAFETY: the caller of segreg_attach_nonblocking guarantees that
            // `f` may be called with the comm and its `ctx` from any thread
            // until detach (the hook is only called before that).
            let rc = unsafe { f(raw.0 as *mut c_void, ctx.0 as *mut c_void) };
            if rc == 0 {
                Ok(())
            } else {
                Err(format!("the owner's abort hook returned {rc}"))
            }
        });
        let mut opts = AttachOptions::new().borrowed_nonblocking(hook);
        if checked != 0 {
            opts = opts.checked();
        }
        if let Some(d) = deadline_of(deadline_ms) {
            opts = opts.deadline(d);
        }
        attach_with(comm, opts)
    })
}

/// Registers with the attached comm every live segment it has not seen
/// (collective: call it at the same point on every rank). Returns the
/// number of segments registered, or -1 (unknown comm, comm failed, or the
/// registration failed, which marks the comm failed: detach it; on a
/// checked comm also: the ranks disagree, the agreement failed; a call
/// reached its deadline). [`segreg_register_status`] says which.
pub extern "C" fn segreg_register(comm: *mut c_void) -> c_int {
    api(-1, || {
        let (g, id) = attached(comm)?;
        let s = g.register(id).map_err(|e| e.to_string())?;
        Ok(clamp(s.registered.len()))
    })
}

/// [`segreg_register`] answering with one code per outcome: [`SEGREG_OK`]
/// and `*registered` set to the number of segments registered (when
/// `registered` is non-null), or a `SEGREG_ERR_*` code:
/// [`SEGREG_ERR_DIVERGED`] (checked: nothing registered on any rank; free
/// or allocate so every rank matches, then register again),
/// [`SEGREG_ERR_TIMEOUT`], [`SEGREG_ERR_ABORTED`], [`SEGREG_ERR_FAILED`],
/// [`SEGREG_ERR_AGREEMENT`], [`SEGREG_ERR_BUSY`],
/// [`SEGREG_ERR_NOT_ATTACHED`], [`SEGREG_ERR_INVALID`]. The last error says
/// what happened in words.
///
/// # Safety
/// `registered` must be null or valid for a write of a `size_t`.
pub unsafe extern "C" fn segreg_register_status(
    comm: *mut c_void,
    registered: *mut usize,
) -> c_int {
    let (code, n) = api_coded((SEGREG_ERR_INTERNAL, 0), || {
        let (g, id) = attached(comm).map_err(|m| ((SEGREG_ERR_NOT_ATTACHED, 0), m))?;
        match g.register(id) {
            Ok(s) => Ok((SEGREG_OK, s.registered.len())),
            Err(e) => Err(((register_code(&e), 0), e.to_string())),
        }
    });
    if !registered.is_null() {
        // SAFETY: non-null, and the caller guarantees it is valid for a
        // write of a `size_t`; unaligned write to accept any caller buffer.
        unsafe { registered.write_unaligned(n) };
    }
    code
}

/// Takes part in the attached checked comm's pass without registering
/// (this rank cannot register now): call it where `segreg_register` would
/// be called; every rank's pass then fails at once with
/// [`SEGREG_ERR_DIVERGED`] instead of waiting for this one. Returns that
/// code (the expected outcome), or why the rank could not take part
/// ([`SEGREG_ERR_NOT_CHECKED`], [`SEGREG_ERR_BUSY`], ...).
pub extern "C" fn segreg_abstain(comm: *mut c_void) -> c_int {
    let (code, ()) = api_coded((SEGREG_ERR_INTERNAL, ()), || {
        let (g, id) = attached(comm).map_err(|m| ((SEGREG_ERR_NOT_ATTACHED, ()), m))?;
        let e = g.abstain(id);
        Err(((register_code(&e), ()), e.to_string()))
    });
    code
}

/// Runs a pass for every attached comm, in attach order. Returns the total
/// number of segments registered, or -1 if any comm's pass failed (the
/// others still ran; the last error names the failures).
pub extern "C" fn segreg_register_all() -> c_int {
    api(-1, || {
        let g = global_allocator()?;
        let mut total = 0usize;
        let mut errors = Vec::new();
        for (id, r) in g.register_all() {
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
pub extern "C" fn segreg_detach(comm: *mut c_void) -> c_int {
    api(-1, || {
        let (g, id) = attached(comm)?;
        let r = g.detach(id).map_err(|e| e.to_string())?;
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
        let hit = global_allocator()
            .map_err(invalid)?
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
        let g = global_allocator()?;
        let sim_violations = global_sim_world().map_or(0, |w| w.violations().len());
        let value = SegregStats::from_stats(&g.stats(), sim_violations as u64);
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
pub extern "C" fn segreg_last_error() -> *const c_char {
    last_error_ptr()
}

/// Sim backend only: creates a one-rank simulated comm and returns its raw
/// handle (null on error). Handle values are reused after destroy, like
/// `ncclComm_t` addresses.
pub extern "C" fn segreg_sim_comm_create() -> *mut c_void {
    api(std::ptr::null_mut(), || {
        let w = global_sim_world()?;
        let c = w.comm_create(&[0]).map_err(|e| e.to_string())?;
        Ok(c.first()
            .map_or(std::ptr::null_mut(), |c| c.0 as *mut c_void))
    })
}

/// Sim backend only: like [`segreg_sim_comm_create`], for a comm without
/// symmetric support: its registrations succeed with a null window (as on
/// NCCL 2.29+), so [`segreg_window_get`] answers [`SEGREG_ERR_NO_WINDOW`].
pub extern "C" fn segreg_sim_comm_create_nosym() -> *mut c_void {
    api(std::ptr::null_mut(), || {
        let w = global_sim_world()?;
        let c = w
            .comm_create_without_symmetric(&[0])
            .map_err(|e| e.to_string())?;
        Ok(c.first()
            .map_or(std::ptr::null_mut(), |c| c.0 as *mut c_void))
    })
}

/// Sim backend only: like [`segreg_sim_comm_create`], for a non-blocking
/// comm (its calls honour deadlines and may be aborted).
pub extern "C" fn segreg_sim_comm_create_nonblocking() -> *mut c_void {
    api(std::ptr::null_mut(), || {
        let w = global_sim_world()?;
        let c = w.comm_create_nonblocking(&[0]).map_err(|e| e.to_string())?;
        Ok(c.first()
            .map_or(std::ptr::null_mut(), |c| c.0 as *mut c_void))
    })
}

/// Sim backend only: the comm's next registration never completes until
/// the comm is aborted (a lost rendezvous). Returns 0 or -1.
pub extern "C" fn segreg_sim_stall_next_register(comm: *mut c_void) -> c_int {
    api(-1, || {
        let raw = comm_of(comm)?;
        global_sim_world()?
            .stall_next(raw, crate::sim::SimOp::Register)
            .map_err(|e| e.to_string())?;
        Ok(0)
    })
}

/// Sim backend only: `ncclCommAbort` of a simulated comm, as its owner's
/// abort hook would call it. Returns 0 or -1.
pub extern "C" fn segreg_sim_comm_abort(comm: *mut c_void) -> c_int {
    api(-1, || {
        let raw = comm_of(comm)?;
        let rank = global_sim_world()?.rank(0).ok_or("no rank 0")?;
        rank.comm_abort(raw).map_err(|e| e.to_string())?;
        Ok(0)
    })
}

/// Sim backend only: destroys a simulated comm (violations are recorded if
/// windows are still registered on it). Returns 0 or -1.
pub extern "C" fn segreg_sim_comm_destroy(comm: *mut c_void) -> c_int {
    api(-1, || {
        let raw = comm_of(comm)?;
        global_sim_world()?
            .comm_destroy(raw)
            .map_err(|e| e.to_string())?;
        Ok(0)
    })
}

/// Sim backend only: the number of NCCL rule violations recorded (after
/// the end-of-run checks), or -1.
pub extern "C" fn segreg_sim_violations() -> i64 {
    api(-1, || {
        let n = global_sim_world()?.verify().len();
        i64::try_from(n).map_err(|_| "overflow".to_string())
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::deadline_of;

    /// Only a positive number of milliseconds is a deadline; zero and
    /// negative values leave the environment's or the default.
    #[test]
    fn a_deadline_is_positive_milliseconds() {
        assert_eq!(deadline_of(1500), Some(Duration::from_millis(1500)));
        assert_eq!(deadline_of(1), Some(Duration::from_millis(1)));
        assert_eq!(deadline_of(0), None);
        assert_eq!(deadline_of(-5), None);
    }
}
