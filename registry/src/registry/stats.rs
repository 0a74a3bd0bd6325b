//! The registry's figures: `stats` and `flush`.

use std::collections::BTreeMap;
use std::ptr;

use super::Registry;
use crate::index::AddressIndex;
use crate::node::Node;
use crate::results::{CommStats, NodeCounts, Stats};
use crate::state::Phase;
use crate::sync::uninstrumented;
use crate::CommId;

impl<C, W, I: AddressIndex> Registry<C, W, I> {
    /// A weakly consistent snapshot of the registry's figures.
    pub fn stats(&self) -> Stats {
        let _guard = self.reclaimer.guard();
        let slots: Vec<_> = self.comms.read().unwrap().values().cloned().collect();
        let mut windows: BTreeMap<CommId, usize> = BTreeMap::new();
        self.index.for_each(&mut |_, oref| {
            // SAFETY: protected by the guard.
            let o = unsafe { &*oref.as_ptr::<Node<W>>() };
            o.get()
                .records
                .count_open(|c| *windows.entry(c).or_default() += 1);
            true
        });
        let comms = slots
            .iter()
            .map(|s| CommStats {
                comm: s.id,
                windows: windows.get(&s.id).copied().unwrap_or(0),
                pending: self.pending(s.id).unwrap_or(0),
            })
            .collect();
        let (mut in_log, mut dead_in_log) = (0, 0);
        self.walk_log(self.head, ptr::null(), |o| {
            in_log += 1;
            if o.load_state().phase() == Phase::Dead {
                dead_in_log += 1;
            }
        });
        let c = &self.counters;
        Stats {
            live_segments: c.live_segments(),
            live_bytes: c.live_bytes(),
            comms,
            nodes: NodeCounts {
                allocated: c.allocated_total(),
                retired: c.retired_total(),
                freed: c.freed_total(),
                in_log,
                dead_in_log,
                sweeps: c.sweeps.load(uninstrumented::Ordering::Relaxed),
                pass_steps: c.pass_steps.load(uninstrumented::Ordering::Relaxed),
            },
        }
    }

    /// Runs the reclaimer's deferred frees that are due (tests and soaks call
    /// it before reading [`NodeCounts::freed`]).
    pub fn flush(&self) {
        for _ in 0..4 {
            self.reclaimer.guard().flush();
        }
    }
}
