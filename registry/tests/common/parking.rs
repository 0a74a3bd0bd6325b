//! An address index that parks one call of a `track` or an `untrack`, so
//! that a test can hold it at a chosen step while other operations run: the
//! production [`SkipIndex`] behind the public [`AddressIndex`] trait, plus
//! one armed pause point, taken by the first matching call (a registry
//! builds its index through `AddressIndex::new`, which takes no arguments,
//! so the points are process-wide: each test arms keys no other test of its
//! binary uses).
#![allow(dead_code)] // each test binary uses its own part

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use segment_registry::{AddressIndex, NodeRef, SkipIndex};

/// Where the armed track parks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Point {
    /// In `insert(key, _)`, before it inserts: the track's first step (the
    /// naive cursor's seq is taken already; the node is not visible).
    Insert(usize),
    /// At the end of `for_each_between(key, _)`: the track's overlap scan
    /// is done and it has not committed yet.
    AfterScan(usize),
    /// In `remove(key, _)`, before it removes: with this index (which keeps
    /// the trait's default `get_then_remove`) an untrack parks there after
    /// making its segment dead, with the entry still in the index.
    Remove(usize),
}

/// One armed pause point and where its track is.
struct Armed {
    point: Point,
    /// A call reached it (and, unless resumed, waits there).
    parked: bool,
    resumed: bool,
}

/// Every armed point, of every test of the binary (they run in parallel,
/// each with keys of its own).
static GATE: Mutex<Vec<Armed>> = Mutex::new(Vec::new());
static GATE_CV: Condvar = Condvar::new();
/// How long either side waits before failing the test instead of hanging.
const PATIENCE: Duration = Duration::from_secs(20);

/// Arms `point`: the first matching call parks until [`resume`]`(point)`.
pub(crate) fn arm(point: Point) {
    let mut g = GATE.lock().unwrap();
    g.retain(|a| a.point != point);
    g.push(Armed {
        point,
        parked: false,
        resumed: false,
    });
}

/// Blocks until a call has parked at `point`.
pub(crate) fn wait_parked(point: Point) {
    let g = GATE.lock().unwrap();
    let parked = |g: &Vec<Armed>| g.iter().any(|a| a.point == point && a.parked);
    let (g, to) = GATE_CV
        .wait_timeout_while(g, PATIENCE, |g| !parked(g))
        .unwrap();
    assert!(!to.timed_out() && parked(&g), "no call reached {point:?}");
}

/// Lets the call parked at `point` go on.
pub(crate) fn resume(point: Point) {
    let mut g = GATE.lock().unwrap();
    for a in g.iter_mut().filter(|a| a.point == point) {
        a.resumed = true;
    }
    GATE_CV.notify_all();
}

/// Parks here if `point` is armed and not taken yet.
fn maybe_park(point: Point) {
    let mut g = GATE.lock().unwrap();
    let Some(a) = g.iter_mut().find(|a| a.point == point && !a.parked) else {
        return;
    };
    a.parked = true;
    GATE_CV.notify_all();
    let resumed = |g: &Vec<Armed>| g.iter().any(|a| a.point == point && a.resumed);
    let (g, to) = GATE_CV
        .wait_timeout_while(g, PATIENCE, |g| !resumed(g))
        .unwrap();
    assert!(
        !to.timed_out() && resumed(&g),
        "the test never resumed {point:?}"
    );
}

/// The production index, whose armed call parks (see [`arm`]).
pub(crate) struct ParkingIndex(SkipIndex);

impl AddressIndex for ParkingIndex {
    fn new() -> Self {
        ParkingIndex(<SkipIndex as AddressIndex>::new())
    }

    fn insert(&self, key: usize, node: NodeRef) -> Result<(), NodeRef> {
        maybe_park(Point::Insert(key));
        self.0.insert(key, node)
    }

    fn remove(&self, key: usize, node: NodeRef) -> bool {
        maybe_park(Point::Remove(key));
        self.0.remove(key, node)
    }

    fn get(&self, key: usize) -> Option<NodeRef> {
        self.0.get(key)
    }

    fn below(&self, key: usize) -> Option<(usize, NodeRef)> {
        self.0.below(key)
    }

    fn at_or_below(&self, key: usize) -> Option<(usize, NodeRef)> {
        self.0.at_or_below(key)
    }

    fn for_each_between(&self, lo: usize, hi: usize, f: &mut dyn FnMut(usize, NodeRef) -> bool) {
        self.0.for_each_between(lo, hi, f);
        maybe_park(Point::AfterScan(lo));
    }

    fn for_each(&self, f: &mut dyn FnMut(usize, NodeRef) -> bool) {
        self.0.for_each(f)
    }
}
