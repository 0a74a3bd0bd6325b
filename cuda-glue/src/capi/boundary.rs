//! The C boundary: the thread's last-error slot, and the wrapper every
//! entry point runs in, which neither unwinds into C nor aborts, also when
//! called after the thread's thread-locals are destroyed.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    /// The message of the thread's last call; `None` when it succeeded.
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

/// What [`segreg_last_error`](super::segreg_last_error) answers once the
/// calling thread's thread-locals are destroyed (at thread or process
/// exit), where no message can be kept.
const NO_SLOT: &CStr = c"no message kept: this thread's storage is gone (a call made during \
thread or process exit); the call's return value tells whether it failed";

/// Stores the outcome of the thread's call (`None`: success). Never
/// panics: once the thread's locals are destroyed (`try_with` fails) the
/// outcome is not stored, and the slot is never borrowed across a call.
fn set_last_error(msg: Option<&str>) {
    let msg = msg.map(|m| CString::new(m.replace('\0', " ")).unwrap_or_default());
    let _ = LAST_ERROR.try_with(|slot| {
        if let Ok(mut s) = slot.try_borrow_mut() {
            *s = msg;
        }
    });
}

/// The thread's stored message, null after a success, or [`NO_SLOT`].
pub(super) fn last_error_ptr() -> *const c_char {
    LAST_ERROR
        .try_with(|slot| {
            slot.try_borrow()
                .ok()
                .and_then(|s| s.as_ref().map(|c| c.as_ptr()))
                .unwrap_or(std::ptr::null())
        })
        .unwrap_or(NO_SLOT.as_ptr())
}

/// Runs an entry point: clears the thread's last error, runs `f` under
/// `catch_unwind`, and turns `Err((value, message))` into `value` plus the
/// message, and a panic (a bug) into `internal` plus a message. Nothing
/// here panics, also after the thread's locals are gone, so no entry
/// point unwinds into C or aborts.
pub(super) fn api_coded<R>(internal: R, f: impl FnOnce() -> Result<R, (R, String)>) -> R {
    set_last_error(None);
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err((v, msg))) => {
            set_last_error(Some(&msg));
            v
        }
        Err(_) => {
            set_last_error(Some("internal error (panic caught at the C boundary)"));
            internal
        }
    }
}

/// [`api_coded`] for the entry points that answer every failure with the
/// same value `fail`.
pub(super) fn api<R: Copy>(fail: R, f: impl FnOnce() -> Result<R, String>) -> R {
    api_coded(fail, || f().map_err(|msg| (fail, msg)))
}
