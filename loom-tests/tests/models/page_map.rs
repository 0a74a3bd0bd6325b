//! Lookups through the page map (DESIGN.md §1 Linearizability and Cost, §3
//! "page map"): racing address reuse, a lookup finds what a finished pass
//! registered and what a returned track made live, never a segment whose
//! untrack returned, and nothing else; counts stay exact when a late
//! withdrawal meets new sharers; a slot never names a node that may have
//! been freed.

use std::sync::atomic::AtomicUsize;

use loom::sync::atomic::Ordering;
use loom::sync::Arc;
use loom::thread;

use segment_registry::Faults;
use segment_registry_loom::{slot_addr, Model, STRIDE};

use crate::common::{
    drain, faults, flag, new_registry, pass_ok, sweeping_registry, untrack, Ledger,
};

/// W (grid slot 0) and V (slot 1) are tracked and registered. One thread
/// untracks W while another tracks X at W's address (address reuse: X may
/// replace W's slot in the page map); the main thread runs a pass, then
/// looks the address up. With `granule` one stride, W and X each have
/// their granule to themselves; with four strides, W, X and V share one
/// granule (counted slots, answered by the skiplist).
///
/// * a segment that a finished pass registered, and that nobody untracks,
///   is found, with its window;
/// * a lookup that begins after W's untrack returned never finds W;
/// * a lookup that begins after X's track returned finds X;
/// * a lookup finds only W, X or nothing at that address.
fn page_map_races_address_reuse(faults: Faults, granule: usize) {
    let reg = Arc::new(new_registry(faults).with_page_granule(granule));
    let ledger = Arc::new(Ledger::default());
    let comm = reg.attach(0);
    let w = reg.track(slot_addr(0), STRIDE).unwrap();
    let v = reg.track(slot_addr(1), STRIDE).unwrap();
    assert_eq!(pass_ok(&reg, comm, &ledger).registered, vec![w, v]);
    let (w_gone, x_tracked) = (flag(), flag());
    let hw = {
        let (reg, ledger, w_gone) = (reg.clone(), ledger.clone(), w_gone.clone());
        thread::spawn(move || {
            untrack(&reg, w.addr, &ledger).expect("W is tracked");
            w_gone.store(true, Ordering::Release);
        })
    };
    let hx = {
        let (reg, x_tracked) = (reg.clone(), x_tracked.clone());
        thread::spawn(move || {
            let x = reg.track(slot_addr(0), STRIDE);
            if x.is_ok() {
                x_tracked.store(true, Ordering::Release);
            }
            x.ok()
        })
    };
    let out = pass_ok(&reg, comm, &ledger);
    for s in &out.registered {
        let found = reg.window_of(comm, s.addr + 8, 8);
        assert!(
            matches!(found, Ok(f) if f.window == (comm, *s) && f.offset == 8),
            "a segment a finished pass registered was not found: {s:?}, {found:?}"
        );
    }
    let w_gone_before = w_gone.load(Ordering::Acquire);
    let x_before = x_tracked.load(Ordering::Acquire);
    let found = reg.find(slot_addr(0) + 8);
    if let Some(s) = found {
        assert!(
            s.addr == w.addr && s.len == STRIDE,
            "a stranger was found: {s:?}"
        );
    }
    if w_gone_before {
        assert_ne!(found, Some(w), "found a segment whose untrack had returned");
    }
    if x_before {
        assert!(
            found.is_some_and(|s| s.seq > v.seq),
            "a tracked segment was not found: {found:?}"
        );
    }
    assert_eq!(reg.find(v.addr), Some(v));
    hw.join().unwrap();
    let x = hx.join().unwrap();
    // Once both are done, the address holds X or nothing.
    assert_eq!(reg.find(slot_addr(0)), x);
    drop(drain(&reg, &ledger));
    ledger.assert_windows_exactly_once();
}

#[test]
fn lookups_race_address_reuse() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new("page_map::lookups_race_address_reuse", 3)
        .check(&RUNS, || page_map_races_address_reuse(Faults::NONE, STRIDE));
}

#[test]
fn shared_granule_lookups_race_address_reuse() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new("page_map::shared_granule_lookups_race_address_reuse", 3).check(&RUNS, || {
        page_map_races_address_reuse(Faults::NONE, 4 * STRIDE)
    });
}

#[test]
#[should_panic(expected = "a segment a finished pass registered was not found")]
fn negative_late_page_publish_misses_a_registered_segment() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new(
        "page_map::negative_late_page_publish_misses_a_registered_segment",
        3,
    )
    .check_fails(
        &RUNS,
        "a segment a finished pass registered was not found",
        || page_map_races_address_reuse(faults(|f| f.late_page_publish = true), STRIDE),
    );
}

/// W, V, T, T2 tracked; sweeps on (`with_sweep_slack(0)`). One thread
/// untracks W; another tracks a range at W's address that overlaps V (so it
/// is always rejected, but its insert may meet W dead and take W out of the
/// index before W's untrack has withdrawn it from the page map); a third
/// untracks T and T2 (which sweeps) and then looks W's address up, while
/// the main thread waits (so each of those switches is free, and the
/// three-thread race fits the preemption bound).
///
/// * no node is read after it could have been freed (model reclaimer);
/// * the lookup finds W or nothing;
/// * the overlapping track is refused.
fn page_map_slot_outlives_index_removal(faults: Faults) {
    let reg = sweeping_registry(faults);
    let w = reg.track(slot_addr(0), STRIDE).unwrap();
    let _v = reg.track(slot_addr(1), STRIDE).unwrap();
    let t = reg.track(slot_addr(2), STRIDE).unwrap();
    let t2 = reg.track(slot_addr(3), STRIDE).unwrap();
    let hu = {
        let reg = reg.clone();
        thread::spawn(move || drop(reg.untrack(w.addr).expect("W is tracked")))
    };
    let hx = {
        let reg = reg.clone();
        thread::spawn(move || reg.track(slot_addr(0), 2 * STRIDE).is_err())
    };
    let hs = {
        let reg = reg.clone();
        thread::spawn(move || {
            drop(reg.untrack(t.addr).expect("T is tracked"));
            drop(reg.untrack(t2.addr).expect("T2 is tracked"));
            reg.find(slot_addr(0) + 8)
        })
    };
    hu.join().unwrap();
    let refused = hx.join().unwrap();
    let found = hs.join().unwrap();
    assert!(refused, "a track overlapping a live segment was accepted");
    assert!(
        found.is_none() || found == Some(w),
        "a stranger was found: {found:?}"
    );
    assert_eq!(reg.find(slot_addr(0)), None);
}

#[test]
fn slot_outlives_index_removal() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new("page_map::slot_outlives_index_removal", 3)
        .max_branches(20_000)
        .check(&RUNS, || page_map_slot_outlives_index_removal(Faults::NONE));
}

#[test]
#[should_panic(expected = "access to a reclaimed node")]
fn negative_skip_page_withdraw_leaves_a_slot_naming_a_freed_node() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new(
        "page_map::negative_skip_page_withdraw_leaves_a_slot_naming_a_freed_node",
        3,
    )
    .max_branches(20_000)
    .check_fails(&RUNS, "access to a reclaimed node", || {
        page_map_slot_outlives_index_removal(faults(|f| f.skip_page_withdraw = true))
    });
}

/// Page granule of four strides. M and K share a granule (count 2); K
/// leaves (count 1). One thread untracks M while the main thread tracks Y
/// over the whole granule (possible once M is dead), untracks it, tracks P
/// and Q in the granule and untracks Q; M's withdrawal may run at any point
/// of that, or stall in the middle.
///
/// * once everything is done, P (live throughout its part) is found.
fn page_map_count_survives_a_late_withdraw(faults: Faults) {
    let reg = Arc::new(new_registry(faults).with_page_granule(4 * STRIDE));
    let m = reg.track(slot_addr(0), STRIDE).unwrap();
    let k = reg.track(slot_addr(1), STRIDE).unwrap();
    drop(reg.untrack(k.addr).unwrap());
    let hm = {
        let reg = reg.clone();
        thread::spawn(move || drop(reg.untrack(m.addr).expect("M is tracked")))
    };
    // Y (and P, which overlaps M) can be tracked only once M is dead.
    let Ok(y) = reg.track(slot_addr(0), 4 * STRIDE) else {
        hm.join().unwrap();
        return;
    };
    drop(reg.untrack(y.addr).unwrap());
    let p = reg.track(slot_addr(0), STRIDE).unwrap();
    let q = reg.track(slot_addr(1), STRIDE).unwrap();
    drop(reg.untrack(q.addr).unwrap());
    hm.join().unwrap();
    assert_eq!(
        reg.find(slot_addr(0) + 8),
        Some(p),
        "a live segment was not found after its neighbours left"
    );
}

#[test]
fn count_survives_a_late_withdraw() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new("page_map::count_survives_a_late_withdraw", 3)
        .max_branches(20_000)
        .check(&RUNS, || {
            page_map_count_survives_a_late_withdraw(Faults::NONE)
        });
}

#[test]
#[should_panic(expected = "a live segment was not found after its neighbours left")]
fn negative_page_overwrite_loses_a_live_segment() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    Model::new("page_map::negative_page_overwrite_loses_a_live_segment", 3)
        .max_branches(20_000)
        .check_fails(
            &RUNS,
            "a live segment was not found after its neighbours left",
            || page_map_count_survives_a_late_withdraw(faults(|f| f.page_overwrite = true)),
        );
}
