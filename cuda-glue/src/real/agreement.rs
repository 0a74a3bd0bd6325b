//! The checked pass's all-reduce on real NCCL: a device buffer and a
//! non-blocking stream per agreement comm, made at attach (so that the
//! agreement allocates nothing), and an all-reduce whose every wait is a
//! poll from the calling thread: the enqueue (`ncclInProgress` on a
//! non-blocking comm), then the stream (`cuStreamQuery`, never
//! `cuStreamSynchronize`), each asking the [`Wait`] between polls.
//!
//! Copies go through the same stream: host to device asynchronously (NCCL
//! has the words before the all-reduce runs), device to host only once the
//! stream is idle, so neither waits behind work of the application on
//! the legacy default stream.

use std::ffi::c_void;

use cudarc::driver::sys::{self as cu, CUdeviceptr, CUstream};
use cudarc::nccl::sys::cudaStream_t;

use super::backend::{live_comm, RealBackend};
use super::context::driver;
use crate::backend::{AtDeadline, BackendError, Backoff, RawComm, Wait, MAX_AGREEMENT_WORDS};
use crate::util::lock;

/// What one agreement comm's all-reduce uses.
pub(crate) struct Scratch {
    device: i32,
    /// `CUstream`, as an address (raw pointers are not `Send`).
    stream: usize,
    /// Device memory for [`MAX_AGREEMENT_WORDS`] `u64`s.
    buf: CUdeviceptr,
}

/// Whether `stream` has finished its work: `cuStreamQuery` answers
/// `CUDA_SUCCESS` (done) or `CUDA_ERROR_NOT_READY` (still running).
fn stream_idle(stream: CUstream) -> Result<bool, BackendError> {
    let query = std::panic::catch_unwind(|| {
        // SAFETY: a stream made by `agreement_setup` and not destroyed yet
        // (the scratch entry is held while it is used).
        unsafe { cu::cuStreamQuery(stream) }
    });
    match query {
        Ok(cu::CUresult::CUDA_SUCCESS) => Ok(true),
        Ok(cu::CUresult::CUDA_ERROR_NOT_READY) => Ok(false),
        Ok(e) => Err(BackendError::Driver {
            call: "cuStreamQuery",
            message: format!("{e:?}"),
        }),
        Err(_) => Err(BackendError::Driver {
            call: "cuStreamQuery",
            message: "the driver library lacks cuStreamQuery".into(),
        }),
    }
}

impl RealBackend {
    /// Makes the buffer and the stream of `comm`'s agreement on its device.
    pub(super) fn agreement_setup(&self, comm: RawComm) -> Result<(), BackendError> {
        let c = live_comm(comm, "ncclAllReduce")?;
        // SAFETY: a live comm (the caller just made it by a split).
        let device = unsafe { self.api.comm_cu_device(c) }?.unwrap_or(0);
        let scratch = self.contexts.on_device(device, || {
            let stream = driver("cuStreamCreate", || {
                cudarc::driver::result::stream::create(
                    cudarc::driver::result::stream::StreamKind::NonBlocking,
                )
            })?;
            let bytes = MAX_AGREEMENT_WORDS * std::mem::size_of::<u64>();
            // SAFETY: a plain allocation on the current (the comm's) device.
            let buf = driver("cuMemAlloc", || unsafe {
                cudarc::driver::result::malloc_sync(bytes)
            });
            match buf {
                Ok(buf) => Ok(Scratch {
                    device,
                    stream: stream as usize,
                    buf,
                }),
                Err(e) => {
                    // SAFETY: just made, unused.
                    let _ = unsafe { cudarc::driver::result::stream::destroy(stream) };
                    Err(e)
                }
            }
        })?;
        if let Some(old) = lock(&self.scratch).insert(comm.0, scratch) {
            self.free_scratch(old);
        }
        Ok(())
    }

    /// The all-reduce (`max`, in place) of `words` on `comm`, waited for
    /// as `wait` says.
    pub(super) fn agreement_all_reduce(
        &self,
        comm: RawComm,
        words: &mut [u64],
        wait: &Wait<'_>,
    ) -> Result<(), BackendError> {
        let c = live_comm(comm, "ncclAllReduce")?;
        if words.is_empty() || words.len() > MAX_AGREEMENT_WORDS {
            return Err(BackendError::InvalidArgument {
                call: "ncclAllReduce",
                reason: format!("{} words", words.len()),
            });
        }
        let (device, stream, buf) = {
            let map = lock(&self.scratch);
            let s = map.get(&comm.0).ok_or(BackendError::InvalidArgument {
                call: "ncclAllReduce",
                reason: format!("{comm:?} has no agreement buffer (all_reduce_setup first)"),
            })?;
            (s.device, s.stream as CUstream, s.buf)
        };
        self.contexts.on_device(device, || {
            driver("cuMemcpyHtoDAsync", || {
                // SAFETY: `buf` holds MAX_AGREEMENT_WORDS u64 (checked above);
                // pageable memory is staged before the call returns.
                unsafe { cudarc::driver::result::memcpy_htod_async(buf, words, stream) }
            })?;
            // SAFETY: a live comm on the current device; `buf` holds
            // `words.len()` u64 on it; `stream` is a stream of it.
            unsafe {
                self.api.all_reduce_max_u64(
                    buf as *mut c_void,
                    words.len(),
                    c,
                    stream as cudaStream_t,
                    wait,
                )
            }?;
            self.wait_stream(c, stream, wait)?;
            driver("cuMemcpyDtoHAsync", || {
                // SAFETY: the stream is idle, so the copy into pageable
                // memory completes before the call returns.
                unsafe { cudarc::driver::result::memcpy_dtoh_async(words, buf, stream) }
            })
        })
    }

    /// Polls `stream` until idle, and the comm for an asynchronous error
    /// meanwhile (a peer gone), asking `wait` between polls.
    fn wait_stream(
        &self,
        c: cudarc::nccl::sys::ncclComm_t,
        stream: CUstream,
        wait: &Wait<'_>,
    ) -> Result<(), BackendError> {
        let mut backoff = Backoff::new();
        loop {
            if stream_idle(stream)? {
                return Ok(());
            }
            // SAFETY: the live comm of the all-reduce; not aborted yet.
            unsafe { self.api.async_error(c) }?;
            if wait.check() == Some(AtDeadline::Aborted) {
                return Err(wait.timeout("ncclAllReduce", RawComm(c as usize)));
            }
            backoff.pause(wait);
        }
    }

    /// Frees `comm`'s agreement buffer and stream, if any.
    pub(super) fn agreement_teardown(&self, comm: RawComm) {
        let old = lock(&self.scratch).remove(&comm.0);
        if let Some(s) = old {
            self.free_scratch(s);
        }
    }

    fn free_scratch(&self, s: Scratch) {
        let _ = self.contexts.on_device(s.device, || {
            // SAFETY: made by `agreement_setup`, out of the map now, so no
            // call uses it any more. A stream with work left (an aborted
            // all-reduce) is destroyed once that work ends.
            driver("cuStreamDestroy", || unsafe {
                cudarc::driver::result::stream::destroy(s.stream as CUstream)
            })?;
            // SAFETY: as above; the comm's abort ended its kernels.
            driver("cuMemFree", || unsafe {
                cudarc::driver::result::memory_free(s.buf)
            })
        });
    }
}
