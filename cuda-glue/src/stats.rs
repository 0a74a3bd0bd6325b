//! The allocator's statistics, listed once.
//!
//! The one [`stats_table!`] below names every figure, in the order of the
//! published C struct `segreg_stats_t` (which only ever grows at the end),
//! each row with its doc and its source:
//!
//! * `counter`: an atomic the allocator bumps ([`Counters`]), a `u64` of
//!   [`AllocatorStats`];
//! * `figure T`: computed when a snapshot is taken ([`Figures`]), a `T` of
//!   [`AllocatorStats`];
//! * `derived f`: only in the C struct, `f(&snapshot, sim_violations)`.
//!
//! From it come [`Counters`], [`Figures`], [`AllocatorStats`],
//! [`SegregStats`] (every row, as `u64`), the copy
//! [`SegregStats::from_stats`] and [`SegregStats::FIELDS`] (each C field's
//! name and offset, which `tests/header.rs` checks against the header).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::allocator::{CommInfo, CommState};

/// Counts one event.
pub(crate) fn bump(c: &AtomicU64) {
    // Relaxed: statistics, never used to decide anything.
    c.fetch_add(1, Ordering::Relaxed);
}

/// Reads a counter.
pub(crate) fn get(c: &AtomicU64) -> u64 {
    // Relaxed: statistics only.
    c.load(Ordering::Relaxed)
}

/// A figure as the C struct holds it (saturating: a `usize` above
/// `u64::MAX` cannot occur on the 64-bit targets the glue runs on).
trait ToU64 {
    fn to_u64(self) -> u64;
}

impl ToU64 for u64 {
    fn to_u64(self) -> u64 {
        self
    }
}

impl ToU64 for usize {
    fn to_u64(self) -> u64 {
        u64::try_from(self).unwrap_or(u64::MAX)
    }
}

/// Sorts the rows by source (keeping the table's order for the structs),
/// then defines the types; see the module docs.
macro_rules! stats_table {
    (@rows [$($n:tt)*] [$($f:tt)*] [$($r:tt)*] [$($c:tt)*]
        $(#[doc = $d:literal])* $name:ident: counter, $($rest:tt)*) => {
        stats_table!(@rows [$($n)* $name] [$($f)*] [$($r)* [$($d)*] $name u64]
            [$($c)* [$($d)*] $name (copy)] $($rest)*);
    };
    (@rows [$($n:tt)*] [$($f:tt)*] [$($r:tt)*] [$($c:tt)*]
        $(#[doc = $d:literal])* $name:ident: figure $t:ty, $($rest:tt)*) => {
        stats_table!(@rows [$($n)*] [$($f)* $name $t] [$($r)* [$($d)*] $name $t]
            [$($c)* [$($d)*] $name (copy)] $($rest)*);
    };
    (@rows [$($n:tt)*] [$($f:tt)*] [$($r:tt)*] [$($c:tt)*]
        $(#[doc = $d:literal])* $name:ident: derived $from:path, $($rest:tt)*) => {
        stats_table!(@rows [$($n)*] [$($f)*] [$($r)*]
            [$($c)* [$($d)*] $name ($from)] $($rest)*);
    };
    (@rows [$($counter:ident)*] [$($figure:ident $ft:ty)*]
        [$([$($rd:literal)*] $rname:ident $rt:ty)*]
        [$([$($cd:literal)*] $cname:ident $how:tt)*]) => {
        /// The allocator's counters, one atomic per `counter` row.
        #[derive(Default)]
        pub(crate) struct Counters {
            $(pub(crate) $counter: AtomicU64,)*
        }

        /// The `figure` rows, computed when a snapshot is taken.
        pub(crate) struct Figures {
            $(pub(crate) $figure: $ft,)*
        }

        /// A snapshot of the allocator's figures (weakly consistent).
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        pub struct AllocatorStats {
            $($(#[doc = $rd])* pub $rname: $rt,)*
            /// Attached comms, in attach order.
            pub comms: Vec<CommInfo>,
        }

        impl AllocatorStats {
            /// The snapshot of `counters` now, with `figures` and `comms`.
            pub(crate) fn new(counters: &Counters, figures: Figures, comms: Vec<CommInfo>) -> Self {
                AllocatorStats {
                    $($counter: get(&counters.$counter),)*
                    $($figure: figures.$figure,)*
                    comms,
                }
            }
        }

        /// Figures returned by [`segreg_stats`](crate::capi::segreg_stats)
        /// (`segreg_stats_t`, alias of `struct segreg_stats`, in the
        /// header): every row of the table, in its order.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct SegregStats {
            $($(#[doc = $cd])* pub $cname: u64,)*
        }

        impl SegregStats {
            /// Each field's name and byte offset, in order.
            pub const FIELDS: &'static [(&'static str, usize)] =
                &[$((stringify!($cname), std::mem::offset_of!(SegregStats, $cname)),)*];

            /// The C copy of a snapshot; `sim_violations` is the simulated
            /// backend's violation count (0 for real NCCL).
            pub fn from_stats(stats: &AllocatorStats, sim_violations: u64) -> Self {
                SegregStats {
                    $($cname: stats_table!(@value stats, sim_violations, $cname, $how),)*
                }
            }

            /// Each field's name and value, in order (the Python package's
            /// statistics).
            pub fn named(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($cname), self.$cname),)*]
            }
        }
    };
    (@value $stats:ident, $sim:ident, $name:ident, (copy)) => {
        ToU64::to_u64($stats.$name)
    };
    (@value $stats:ident, $sim:ident, $name:ident, ($from:path)) => {
        $from($stats, $sim)
    };
    // The table: after the internal rules, which it would match too.
    ($($rows:tt)*) => {
        stats_table!(@rows [] [] [] [] $($rows)*);
    };
}

stats_table! {
    /// Tracked segments.
    live_segments: figure usize,
    /// Bytes in tracked segments.
    live_bytes: figure usize,
    /// Successful allocations.
    allocs: counter,
    /// Failed allocations.
    alloc_failures: counter,
    /// Successful frees.
    frees: counter,
    /// Refused frees (null, unknown pointer, double free).
    bad_frees: counter,
    /// Registration passes run.
    passes: counter,
    /// Registrations that returned a window.
    windows_registered: counter,
    /// Registrations that returned a null window (no symmetric support).
    null_windows: counter,
    /// Registrations that failed.
    register_failures: counter,
    /// Windows deregistered.
    windows_deregistered: counter,
    /// Windows registered for live segments, all comms.
    windows_live: derived windows_live,
    /// Deregistrations queued behind a call in flight on their comm.
    deregisters_deferred: counter,
    /// Windows handed back by passes (segment freed while held).
    handed_back: counter,
    /// Deregistrations that failed (each is retried).
    deregister_failures: counter,
    /// Deregistrations failed and waiting for a retry.
    windows_stuck: figure usize,
    /// Freed segments whose memory is not yet returned (waiting for
    /// deregistrations or a pass).
    pending_frees: counter,
    /// Successful `ncclMemFree` calls.
    mem_frees: counter,
    /// Failed `ncclMemFree` calls.
    mem_free_failures: counter,
    /// Attached comms.
    comms_attached: derived comms_attached,
    /// Attached comms marked failed.
    comms_failed: derived comms_failed,
    /// Violations recorded by the simulated backend (0 for real NCCL).
    sim_violations: derived sim_violations,
    /// Bookkeeping that found nothing to act on: a window of a comm that
    /// vanished, or a segment released with no free pending. 0 unless the
    /// glue has a bug.
    orphans: counter,
    /// Agreements (all-reduces of a digest) started by checked passes.
    agreements: counter,
    /// Checked passes that ended `Diverged` (nothing registered).
    diverged: counter,
    /// Checked passes whose agreement failed (its comm then failed).
    agreement_failures: counter,
    /// Calls that reached their deadline and were ended by an abort (of
    /// the comm, or of a checked comm's agreement comm).
    timeouts: counter,
    /// Calls on a borrowed blocking comm past their deadline, reported by
    /// the watchdog (nothing may end them).
    stalls: counter,
    /// Comms aborted at a deadline (their state is `Aborted`).
    comms_aborted: counter,
    /// Windows of aborted comms that left the accounting without an NCCL
    /// call (NCCL freed them inside the abort).
    windows_dropped: counter,
}

fn windows_live(s: &AllocatorStats, _: u64) -> u64 {
    s.comms.iter().map(|c| c.windows.to_u64()).sum()
}

fn comms_attached(s: &AllocatorStats, _: u64) -> u64 {
    s.comms.len().to_u64()
}

fn comms_failed(s: &AllocatorStats, _: u64) -> u64 {
    let failed = s.comms.iter().filter(|c| c.state == CommState::Failed);
    failed.count().to_u64()
}

fn sim_violations(_: &AllocatorStats, sim_violations: u64) -> u64 {
    sim_violations
}
