//! The sync shim: every atomic, fence, lock and reclamation call of the
//! registry goes through this module, the protocol's through its root and
//! the deliberately uninstrumented ones through [`uninstrumented`].
//!
//! Two kinds of "pin" exist in the registry, and they are named apart: an
//! *epoch guard* ([`Reclaimer::guard`]) keeps retired nodes from being
//! freed while a thread reads; a *watermark pin* (in a node's state word)
//! keeps a comm's watermark node linked in the log.
//!
//! Normally it re-exports `std`'s atomics and wraps `crossbeam-epoch`. Under
//! the `loom` feature it re-exports loom's atomics and swaps epoch
//! reclamation for a *model reclaimer* ([`Reclaimer`]) that keeps retired
//! nodes alive to the end of the model and fails on any access to a node
//! after the moment it could really have been freed. The protocol code is the
//! same in both builds.

/// Atomics that stay `std` under loom on purpose: statistics, diagnostics
/// and bookkeeping that decide nothing in the protocol (the counters, the
/// overlap winner kept for error messages, the "orphans parked" flag
/// whose mutex is `std` too). Declaring them through this path makes the
/// choice visible where they are declared.
pub(crate) mod uninstrumented {
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
}

#[cfg(not(feature = "loom"))]
pub(crate) use std::sync::{
    atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering},
    Arc, RwLock,
};

#[cfg(feature = "loom")]
pub(crate) use loom::sync::{
    atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering},
    Arc, RwLock,
};

#[cfg(not(feature = "loom"))]
mod reclaim {
    /// Epoch-based reclamation through crossbeam-epoch's default collector.
    #[derive(Default)]
    pub(crate) struct Reclaimer;

    /// A pinned epoch: nodes retired after this guard was pinned are not
    /// freed until it is dropped.
    pub(crate) struct Guard(crossbeam_epoch::Guard);

    impl Reclaimer {
        /// An epoch guard: nodes retired after it was taken are not freed
        /// until it is dropped.
        #[inline]
        pub(crate) fn guard(&self) -> Guard {
            Guard(crossbeam_epoch::pin())
        }
    }

    impl Guard {
        /// Runs `free` once no thread that was pinned when this call was made
        /// is still pinned.
        ///
        /// # Safety
        /// The object `free` destroys must already be unreachable for any
        /// thread that pins after this call, and `free` may run on any thread.
        pub(crate) unsafe fn retire<F: FnOnce()>(&self, _poison: &PoisonFlag, free: F) {
            // SAFETY: the caller guarantees unreachability; crossbeam-epoch
            // defers `free` until every guard pinned before now is dropped.
            unsafe { self.0.defer_unchecked(free) }
        }

        /// Asks crossbeam-epoch to run what it can of the deferred work.
        pub(crate) fn flush(&self) {
            self.0.flush();
        }
    }

    /// The per-node flag the loom model reclaimer sets; empty here.
    #[derive(Default)]
    pub(crate) struct PoisonFlag;

    impl PoisonFlag {
        /// Checks that the node has not been reclaimed; a no-op here.
        #[inline(always)]
        pub(crate) fn check(&self) {}
    }
}

#[cfg(feature = "loom")]
mod reclaim {
    //! The model reclaimer. A retired node is *logically* freed once every
    //! guard that was pinned when it was retired has been dropped: that is
    //! the earliest moment epoch reclamation could free it. From then on the
    //! node's [`PoisonFlag`] is set and every access through the protocol's
    //! accessors panics. The memory itself is kept until the reclaimer is
    //! dropped, so the check never reads freed memory.
    //!
    //! The bookkeeping uses a `std` mutex on purpose: loom runs one thread at
    //! a time, so it never blocks, and it adds no interleavings of its own.

    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    /// The per-node flag set when the node is logically freed.
    #[derive(Default)]
    pub(crate) struct PoisonFlag(Arc<AtomicBool>);

    impl PoisonFlag {
        /// Panics if the node this flag belongs to was logically freed.
        #[track_caller]
        pub(crate) fn check(&self) {
            assert!(
                !self.0.load(Ordering::Relaxed),
                "access to a reclaimed node (model reclaimer)"
            );
        }
    }

    struct Retired {
        waiting_for: BTreeSet<u64>,
        poison: Option<Arc<AtomicBool>>,
        free: Box<dyn FnOnce()>,
    }

    #[derive(Default)]
    struct State {
        next_guard: u64,
        active: BTreeSet<u64>,
        retired: Vec<Retired>,
    }

    /// The model reclaimer of one registry.
    #[derive(Default)]
    pub(crate) struct Reclaimer {
        state: Arc<Mutex<State>>,
    }

    /// A pinned (model) epoch.
    pub(crate) struct Guard {
        id: u64,
        state: Arc<Mutex<State>>,
    }

    impl Reclaimer {
        /// An epoch guard (see the epoch-based reclaimer's).
        pub(crate) fn guard(&self) -> Guard {
            let mut st = self.state.lock().unwrap();
            let id = st.next_guard;
            st.next_guard += 1;
            st.active.insert(id);
            drop(st);
            // crossbeam-epoch's pin ends with fence(SeqCst): a thread that
            // pins after a retirement sees the unlink that preceded it.
            loom::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            Guard {
                id,
                state: self.state.clone(),
            }
        }
    }

    impl Guard {
        /// Retires the node whose flag is `poison`: it is poisoned once every
        /// guard active now has been dropped, and `free` runs when the
        /// reclaimer is dropped.
        ///
        /// # Safety
        /// As for the epoch-based reclaimer: the node must be unreachable for
        /// any thread that pins after this call.
        pub(crate) unsafe fn retire<F: FnOnce()>(&self, poison: &PoisonFlag, free: F) {
            let free: Box<dyn FnOnce() + '_> = Box::new(free);
            // SAFETY: the closure only frees memory owned by the registry,
            // which lives until the reclaimer (one of its fields) is dropped;
            // the reclaimer runs every closure before it is itself dropped.
            let free: Box<dyn FnOnce()> = unsafe { std::mem::transmute(free) };
            // crossbeam-epoch seals retired garbage with fence(SeqCst), then
            // reads the epoch (Global::push_bag).
            loom::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            let mut st = self.state.lock().unwrap();
            let waiting_for = st.active.clone();
            let poison = Some(poison.0.clone());
            st.retired.push(Retired {
                waiting_for,
                poison,
                free,
            });
        }
    }

    impl Guard {
        /// Retires the node as if freed *now* (the `free_without_defer`
        /// negative control): it is poisoned at once, so the next access
        /// panics, and `free` runs when the reclaimer is dropped.
        ///
        /// # Safety
        /// As for [`Guard::retire`].
        pub(crate) unsafe fn retire_now<F: FnOnce()>(&self, poison: &PoisonFlag, free: F) {
            let free: Box<dyn FnOnce() + '_> = Box::new(free);
            // SAFETY: as in `retire`.
            let free: Box<dyn FnOnce()> = unsafe { std::mem::transmute(free) };
            poison.0.store(true, Ordering::Relaxed);
            self.state.lock().unwrap().retired.push(Retired {
                waiting_for: BTreeSet::new(),
                poison: None,
                free,
            });
        }
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            let mut st = self.state.lock().unwrap();
            st.active.remove(&self.id);
            for r in st.retired.iter_mut() {
                r.waiting_for.remove(&self.id);
                if r.waiting_for.is_empty() {
                    if let Some(p) = r.poison.take() {
                        p.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    impl Guard {
        /// Nothing to flush in the model.
        pub(crate) fn flush(&self) {}
    }

    impl Drop for Reclaimer {
        fn drop(&mut self) {
            let retired = std::mem::take(&mut self.state.lock().unwrap().retired);
            for r in retired {
                (r.free)();
            }
        }
    }
}

pub(crate) use reclaim::{Guard, PoisonFlag, Reclaimer};
