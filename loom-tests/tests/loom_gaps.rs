//! Probes of the loom in use: does its DPOR explore a racing load before
//! a thread's "load, then compare-and-swap" on the same atomic?
//!
//! Stock loom 0.7.3 does not (tokio-rs/loom#166, #392): an atomic keeps
//! only its globally last access for the dependency check, so the storing
//! thread's own earlier load hides the other thread's load, and the
//! reordering is never tried. Every state-word update of the registry is
//! such a load-then-CAS loop, so the models explore far fewer interleavings
//! than exist. `vendor/loom` (loom 0.7.3 plus `vendor/loom/dpor.patch`)
//! keeps the last access per thread and passes these probes (the workspace
//! patches loom with it, RESULTS.md).
#![cfg(feature = "loom")]

use std::collections::BTreeSet;
use std::sync::Mutex;

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

/// Every value `model` returns over its exploration.
fn outcomes<T: Ord + Send + 'static>(model: impl Fn() -> T + Send + Sync + 'static) -> BTreeSet<T> {
    let seen = std::sync::Arc::new(Mutex::new(BTreeSet::new()));
    let out = seen.clone();
    loom::model::Builder::new().check(move || {
        let v = model();
        out.lock().unwrap().insert(v);
    });
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    seen
}

/// A thread loads then CASes `x` from 0 to 1; the main thread loads `x`.
/// Both 0 and 1 are possible.
#[test]
fn load_then_cas_is_reordered_before_a_racing_load() {
    let seen = outcomes(|| {
        let x = Arc::new(AtomicUsize::new(0));
        let x2 = x.clone();
        let h = thread::spawn(move || {
            let cur = x2.load(Ordering::Acquire);
            let _ = x2.compare_exchange(cur, 1, Ordering::AcqRel, Ordering::Acquire);
        });
        let v = x.load(Ordering::Acquire);
        h.join().unwrap();
        v
    });
    assert_eq!(seen, BTreeSet::from([0, 1]), "loom missed an interleaving");
}

/// tokio-rs/loom#392: a spawned thread that loads before it stores.
#[test]
fn spawned_thread_that_loads_first_is_explored() {
    let seen = outcomes(|| {
        let a = Arc::new(AtomicBool::new(false));
        let a2 = a.clone();
        let h = thread::spawn(move || {
            let _ = a2.load(Ordering::Relaxed);
            a2.store(true, Ordering::Relaxed);
        });
        let v = a.load(Ordering::Relaxed);
        h.join().unwrap();
        v
    });
    assert_eq!(
        seen,
        BTreeSet::from([false, true]),
        "loom missed an interleaving"
    );
}
