//! Multi-rank helpers, one process per GPU, for the two-rank program
//! (`src/bin/two_ranks.rs`): unique ids between processes, comm init and
//! queries, a checked all-reduce, and host–device copies.

use std::ffi::{c_char, c_void};

use cudarc::nccl::sys::ncclUniqueId;

use super::backend::{live_comm, RealBackend};
use super::context::driver;
use crate::backend::{BackendError, RawComm, Wait};

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
        Ok(UniqueId::from_nccl(&self.api.unique_id()?))
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
        let comm = self
            .contexts
            .on_device(device, || self.api.comm_init_rank(nranks, id, rank))?;
        if comm.is_null() {
            return Err(BackendError::Nccl {
                call: "ncclCommInitRank",
                code: 0,
                message: "returned success and a null comm".into(),
            });
        }
        Ok(RawComm(comm as usize))
    }

    /// `ncclCommInitRankConfig(nranks, id, rank)` with `blocking = 0` on
    /// `device`: joins rank `rank` of a *non-blocking* comm, polled until
    /// it is ready or until `wait`'s deadline (then aborted). Collective, as
    /// [`comm_init_rank`](Self::comm_init_rank). A comm the caller owns,
    /// which the allocator may abort at a deadline (attach it with
    /// [`AttachOptions::owned`](crate::AttachOptions::owned)).
    pub fn comm_init_rank_nonblocking(
        &self,
        device: i32,
        nranks: i32,
        rank: i32,
        id: &UniqueId,
        wait: &Wait<'_>,
    ) -> Result<RawComm, BackendError> {
        if nranks < 1 || rank < 0 || rank >= nranks {
            return Err(BackendError::InvalidArgument {
                call: "ncclCommInitRankConfig",
                reason: format!("rank {rank} of {nranks}"),
            });
        }
        let id = id.to_nccl();
        let comm = self.contexts.on_device(device, || {
            self.api.comm_init_rank_nonblocking(nranks, id, rank, wait)
        })?;
        Ok(RawComm(comm as usize))
    }

    /// `(ncclCommCount, ncclCommUserRank)`: the comm's size and this
    /// process's rank in it.
    ///
    /// # Safety
    /// `comm` must be a live comm made by this process.
    pub unsafe fn comm_rank_info(&self, comm: RawComm) -> Result<(i32, i32), BackendError> {
        let c = live_comm(comm, "ncclCommCount")?;
        // SAFETY: the caller guarantees a live comm.
        let count = unsafe { self.api.comm_count(c) }?;
        // SAFETY: as above.
        let rank = unsafe { self.api.comm_user_rank(c) }?;
        Ok((count, rank))
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
        let c = live_comm(comm, "ncclAllReduce")?;
        if src == 0 || dst == 0 {
            return Err(BackendError::InvalidArgument {
                call: "ncclAllReduce",
                reason: format!("buffers {src:#x} -> {dst:#x}"),
            });
        }
        let reduce = || {
            // SAFETY: the caller guarantees a live comm and `count` f32 in
            // both buffers on its device, which is current here.
            unsafe {
                self.api
                    .all_reduce_sum_f32(src as *const c_void, dst as *mut c_void, count, c)
            }?;
            driver("cuCtxSynchronize", cudarc::driver::result::ctx::synchronize)
        };
        // SAFETY: the caller guarantees a live comm.
        unsafe { self.on_comm_device(c, reduce) }
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
        self.contexts.on_device(device, || {
            driver("cuMemcpyHtoD", || {
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
        self.contexts.on_device(device, || {
            driver("cuMemcpyDtoH", || {
                // SAFETY: the caller guarantees `n` f32 at `src`; `out`
                // holds `n`.
                unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut out, src as u64) }
            })
        })?;
        Ok(out)
    }
}
