//! An address index that parks one call of a `track`, so that a test can
//! hold a track at a chosen step while other operations run: the
//! production [`SkipIndex`] behind the public [`AddressIndex`] trait, plus
//! one armed pause point, taken by the first matching call (a registry
//! builds its index through `AddressIndex::new`, which takes no arguments,
//! so the point is process-wide: each test arms a key no other test of its
//! binary tracks).
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
}

struct Gate {
    armed: Option<Point>,
    parked: bool,
    resumed: bool,
}

static GATE: Mutex<Gate> = Mutex::new(Gate {
    armed: None,
    parked: false,
    resumed: false,
});
static GATE_CV: Condvar = Condvar::new();
/// How long either side waits before failing the test instead of hanging.
const PATIENCE: Duration = Duration::from_secs(20);

/// Arms `point`: the next matching call parks until [`resume`].
pub(crate) fn arm(point: Point) {
    *GATE.lock().unwrap() = Gate {
        armed: Some(point),
        parked: false,
        resumed: false,
    };
}

/// Blocks until a track has parked at the armed point.
pub(crate) fn wait_parked() {
    let g = GATE.lock().unwrap();
    let (g, to) = GATE_CV
        .wait_timeout_while(g, PATIENCE, |g| !g.parked)
        .unwrap();
    assert!(
        !to.timed_out() && g.parked,
        "no track reached the pause point"
    );
}

/// Lets the parked track go on.
pub(crate) fn resume() {
    GATE.lock().unwrap().resumed = true;
    GATE_CV.notify_all();
}

/// Parks here if `point` is the armed one.
fn maybe_park(point: Point) {
    let mut g = GATE.lock().unwrap();
    if g.armed != Some(point) {
        return;
    }
    g.armed = None;
    g.parked = true;
    GATE_CV.notify_all();
    let (g, to) = GATE_CV
        .wait_timeout_while(g, PATIENCE, |g| !g.resumed)
        .unwrap();
    assert!(
        !to.timed_out() && g.resumed,
        "the test never resumed the track"
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
