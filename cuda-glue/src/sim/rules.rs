//! The rule checks of a registration: alignment, ownership and duplicates
//! of its buffer, and the collective sequence of each comm compared across
//! its members (position by position, and the counts at the end).

use super::site::BufferId;
use super::violation::{Mismatch, Violation};
use super::world::{RegEntry, WorldState};
use super::{rejected, SimWorld};
use crate::backend::{BackendError, WINDOW_ALIGN};
use crate::util::lock;

const REGISTER: &str = "ncclCommWindowRegister";

impl SimWorld {
    /// Runs the end-of-run checks (registration counts of every live comm)
    /// and returns every violation recorded.
    pub fn verify(&self) -> Vec<Violation> {
        let mut st = lock(&self.state);
        let ids: Vec<u64> = st.comms.keys().copied().collect();
        for id in ids {
            st.check_counts(id);
        }
        st.violations.clone()
    }

    /// The number of registrations (including failed ones) each member of
    /// the comm made, as `(rank, count)`.
    pub fn registration_counts(&self, comm_id: u64) -> Vec<(usize, usize)> {
        lock(&self.state)
            .comms
            .get(&comm_id)
            .map(|c| c.members.iter().map(|m| (m.rank, m.regs.len())).collect())
            .unwrap_or_default()
    }
}

impl WorldState {
    /// Alignment, ownership and duplicate checks of a registration; the
    /// buffer's name on success.
    pub(super) fn check_buffer(
        &mut self,
        rank: usize,
        id: u64,
        ptr: usize,
        size: usize,
    ) -> Result<Option<BufferId>, BackendError> {
        if ptr % WINDOW_ALIGN != 0 {
            self.violations.push(Violation::Misaligned {
                comm: id,
                rank,
                ptr,
            });
            return Err(rejected(
                REGISTER,
                format!("{ptr:#x} is not 4096-byte aligned"),
            ));
        }
        let Some(buffer) = self.owner(rank, ptr, size) else {
            self.violations.push(Violation::UnknownBuffer {
                comm: id,
                rank,
                ptr,
                size,
            });
            return Err(rejected(
                REGISTER,
                format!("[{ptr:#x}, +{size}) is not device memory of rank {rank}"),
            ));
        };
        let dup = self.windows_of(rank, Some(id), Some(ptr..ptr + size));
        if let Some(&existing) = dup.first() {
            // NCCL accepts it and makes a second window: so does the sim.
            self.violations.push(Violation::DuplicateRegistration {
                comm: id,
                rank,
                ptr,
                existing,
            });
        }
        Ok(Some(buffer))
    }

    /// The allocation of `rank` that holds all of `[ptr, ptr + size)`.
    fn owner(&self, rank: usize, ptr: usize, size: usize) -> Option<BufferId> {
        let end = ptr.checked_add(size).filter(|_| size > 0)?;
        self.ranks[rank]
            .allocs
            .range(..=ptr)
            .next_back()
            .filter(|(&a, alloc)| end <= a + alloc.len)
            .map(|(_, alloc)| alloc.buffer.clone())
    }

    /// Appends a registration to the member's collective sequence and
    /// compares it with the other members' at the same position.
    pub(super) fn record_collective(&mut self, id: u64, idx: usize, entry: RegEntry) {
        // NCCL 2.30 accepts different sizes per rank in one registration.
        let sizes_may_differ = self.version >= 23000;
        let Some(c) = self.comms.get_mut(&id) else {
            return;
        };
        let index = c.members[idx].regs.len();
        let me = c.members[idx].rank;
        let reference = c
            .members
            .iter()
            .enumerate()
            .find(|(i, m)| *i != idx && m.regs.len() > index)
            .map(|(_, m)| (m.rank, m.regs[index].clone()));
        c.members[idx].regs.push(entry.clone());
        let Some((first_rank, first)) = reference else {
            return;
        };
        let what = if first.size != entry.size && !sizes_may_differ {
            Some(Mismatch::Size {
                first: first.size,
                other: entry.size,
            })
        } else if first.buffer != entry.buffer {
            Some(Mismatch::Order {
                first: first.buffer,
                other: entry.buffer,
            })
        } else {
            None
        };
        if let Some(what) = what {
            self.violations.push(Violation::CollectiveMismatch {
                comm: id,
                index,
                ranks: (first_rank, me),
                what,
            });
        }
    }

    /// Reports members of comm `id` whose registration counts differ (once
    /// per comm).
    pub(super) fn check_counts(&mut self, id: u64) {
        let Some(c) = self.comms.get_mut(&id) else {
            return;
        };
        if c.count_reported || c.any_aborted() {
            return;
        }
        let counts: Vec<(usize, usize)> =
            c.members.iter().map(|m| (m.rank, m.regs.len())).collect();
        if counts.windows(2).any(|w| w[0].1 != w[1].1) {
            c.count_reported = true;
            self.violations
                .push(Violation::CollectiveCountMismatch { comm: id, counts });
        }
    }
}
