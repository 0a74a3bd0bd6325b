//! Simulated device memory: each rank's own fake address space, first fit
//! from the bottom (a freed range is handed out again, as `ncclMemAlloc`
//! does), and the checks of a free.

use super::calls::SimOp;
use super::site::{current_site, BufferId};
use super::violation::Violation;
use super::world::{Alloc, WorldState};
use super::{rejected, SimWorld};
use crate::backend::{BackendError, RawComm, MEM_GRANULARITY};
use crate::util::lock;

/// Base of rank 0's fake device address space.
const VA_BASE: usize = 0x7f00_0000_0000;
/// Distance between two ranks' address spaces.
const VA_STRIDE: usize = 0x20_0000_0000;
/// Capacity of one rank's fake device memory.
const VA_CAPACITY: usize = 0x10_0000_0000;

/// Where rank `rank`'s address space starts (addresses differ between
/// ranks, as in a real job).
pub(super) fn rank_base(rank: usize) -> usize {
    VA_BASE + rank * VA_STRIDE
}

impl SimWorld {
    /// Whether `ptr` is the start of a live allocation of `rank`.
    pub fn is_allocated(&self, rank: usize, ptr: usize) -> bool {
        lock(&self.state)
            .ranks
            .get(rank)
            .is_some_and(|r| r.allocs.contains_key(&ptr))
    }

    pub(super) fn mem_alloc(
        &self,
        rank: usize,
        size: usize,
        device: i32,
    ) -> Result<usize, BackendError> {
        let mut st = lock(&self.state);
        let result = st.mem_alloc(rank, size, device);
        let ptr = *result.as_ref().unwrap_or(&0);
        st.trace(rank, SimOp::MemAlloc, RawComm(0), ptr, None, result.is_ok());
        result
    }

    pub(super) fn mem_free(&self, rank: usize, ptr: usize) -> Result<(), BackendError> {
        let mut st = lock(&self.state);
        let result = st.mem_free(rank, ptr);
        st.trace(rank, SimOp::MemFree, RawComm(0), ptr, None, result.is_ok());
        result
    }
}

impl WorldState {
    fn mem_alloc(&mut self, rank: usize, size: usize, device: i32) -> Result<usize, BackendError> {
        if let Some(e) = self.fault(rank, SimOp::MemAlloc) {
            return Err(e);
        }
        if size == 0 || device < 0 {
            return Err(BackendError::InvalidArgument {
                call: "ncclMemAlloc",
                reason: format!("size {size} on device {device}"),
            });
        }
        let out_of_memory = || rejected("ncclMemAlloc", format!("{size} bytes: out of memory"));
        let len = size
            .checked_next_multiple_of(MEM_GRANULARITY)
            .filter(|&l| l <= VA_CAPACITY)
            .ok_or_else(out_of_memory)?;
        let r = &mut self.ranks[rank];
        let mut at = r.base;
        for (&a, alloc) in &r.allocs {
            if a - at >= len {
                break;
            }
            at = a + alloc.len;
        }
        if at + len > r.base + VA_CAPACITY {
            return Err(out_of_memory());
        }
        let site = current_site();
        let n = r.site_counts.entry(site.clone()).or_insert(0);
        *n += 1;
        let buffer = BufferId { site, index: *n };
        r.allocs.insert(at, Alloc { len, buffer });
        self.stats.allocs += 1;
        Ok(at)
    }

    fn mem_free(&mut self, rank: usize, ptr: usize) -> Result<(), BackendError> {
        if let Some(e) = self.fault(rank, SimOp::MemFree) {
            return Err(e);
        }
        let Some(len) = self.ranks[rank].allocs.get(&ptr).map(|a| a.len) else {
            self.violations.push(Violation::BadFree { rank, ptr });
            return Err(rejected(
                "ncclMemFree",
                format!("{ptr:#x} is not an allocation of rank {rank}"),
            ));
        };
        let end = ptr + len;
        // NCCL returns success and silently keeps the window and the mapping.
        for window in self.windows_of(rank, None, Some(ptr..end)) {
            self.violations
                .push(Violation::FreedWhileRegistered { rank, ptr, window });
        }
        let registering = self.ranks[rank]
            .inflight
            .iter()
            .any(|&(_, p, s)| p < end && ptr < p + s);
        if registering {
            self.violations
                .push(Violation::FreedDuringRegistration { rank, ptr });
        }
        self.ranks[rank].allocs.remove(&ptr);
        self.stats.frees += 1;
        Ok(())
    }
}
