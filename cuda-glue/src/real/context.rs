//! CUDA contexts: each device's primary context (the one PyTorch uses),
//! retained once, and calls made with it current that leave the calling
//! thread's current context as it was.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::result::ctx;
use cudarc::driver::sys::CUcontext;
use cudarc::driver::CudaContext;

use crate::backend::BackendError;
use crate::util::lock;

/// The primary contexts retained so far, by device.
#[derive(Default)]
pub(super) struct Contexts {
    by_device: Mutex<HashMap<i32, Arc<CudaContext>>>,
}

impl Contexts {
    /// The primary context of `device`, retained on first use. Creating it
    /// leaves the calling thread's current context as it was.
    pub(super) fn get(&self, device: i32) -> Result<Arc<CudaContext>, BackendError> {
        let ordinal = usize::try_from(device).map_err(|_| BackendError::InvalidArgument {
            call: "cuDevicePrimaryCtxRetain",
            reason: format!("negative device {device}"),
        })?;
        // Held across the creation: two threads never retain one twice.
        let mut map = lock(&self.by_device);
        if let Some(c) = map.get(&device) {
            return Ok(c.clone());
        }
        // `CudaContext::new` binds the new context to this thread: restore.
        let prev = current()?;
        let made = driver("cuDevicePrimaryCtxRetain", || CudaContext::new(ordinal));
        restore(prev)?;
        let c = made?;
        map.insert(device, c.clone());
        Ok(c)
    }

    /// Runs `f` with `device`'s primary context current, then restores the
    /// thread's previous current context (a PyTorch thread keeps its current
    /// device whatever device we allocate or free on).
    pub(super) fn on_device<T>(
        &self,
        device: i32,
        f: impl FnOnce() -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let target = self.get(device)?.cu_ctx();
        let prev = current()?;
        if prev == Some(target) {
            return f();
        }
        // SAFETY: `target` is a primary context retained in `by_device`,
        // which keeps it alive.
        driver("cuCtxSetCurrent", || unsafe { ctx::set_current(target) })?;
        let r = f();
        let restored = restore(prev);
        let v = r?;
        restored?;
        Ok(v)
    }
}

/// The calling thread's current context (`cuCtxGetCurrent`).
fn current() -> Result<Option<CUcontext>, BackendError> {
    driver("cuCtxGetCurrent", ctx::get_current)
}

/// Makes `prev` (a context that was current on this thread a moment ago, or
/// none) current again.
fn restore(prev: Option<CUcontext>) -> Result<(), BackendError> {
    let c = prev.unwrap_or(std::ptr::null_mut());
    // SAFETY: `c` was current on this thread before our call, which did not
    // destroy it; null unbinds.
    driver("cuCtxSetCurrent", || unsafe { ctx::set_current(c) })
}

/// Runs a cudarc driver call, turning its error (and a panic from a missing
/// driver symbol) into a [`BackendError::Driver`].
pub(super) fn driver<T>(
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
