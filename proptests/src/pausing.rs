//! An address index that can park a thread inside the registry.
//!
//! [`PausingIndex`] is the production [`SkipIndex`] behind the public
//! [`AddressIndex`] trait, plus one armed *pause point*: the first call of
//! the armed kind for the armed key blocks until the test resumes it. A
//! `track` calls [`AddressIndex::insert`] for its start address after (in
//! the naive negative control) taking its seq and before it becomes
//! visible, so parking there scripts "a track still in flight" with public
//! API alone.
//!
//! The index is built by the registry through `AddressIndex::new`, which
//! takes no arguments: [`PauseCtl::install`] hands the control to the next
//! index built on this thread.

use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use segment_registry::{AddressIndex, NodeRef, SkipIndex};

/// Which index call parks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PausePoint {
    /// `insert(key, _)`: the first step of a `track` at `key`.
    Insert(usize),
}

#[derive(Debug, Default)]
struct CtlState {
    armed: Option<PausePoint>,
    parked: bool,
    resumed: bool,
}

/// The test's handle on a [`PausingIndex`].
#[derive(Debug, Default)]
pub struct PauseCtl {
    state: Mutex<CtlState>,
    cv: Condvar,
}

/// How long a parked thread or a waiting test waits before it gives up
/// (and the test fails instead of hanging).
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(20);

thread_local! {
    static NEXT: RefCell<Option<Arc<PauseCtl>>> = const { RefCell::new(None) };
}

impl PauseCtl {
    /// A control with `point` armed.
    pub fn armed(point: PausePoint) -> Arc<Self> {
        Arc::new(PauseCtl {
            state: Mutex::new(CtlState {
                armed: Some(point),
                ..CtlState::default()
            }),
            cv: Condvar::new(),
        })
    }

    /// Makes the next [`PausingIndex`] built on this thread use `ctl`.
    pub fn install(ctl: &Arc<Self>) {
        NEXT.with(|n| *n.borrow_mut() = Some(ctl.clone()));
    }

    /// Blocks until a thread has parked at the armed point.
    pub fn wait_parked(&self) {
        let st = self.state.lock().unwrap();
        let (st, to) = self
            .cv
            .wait_timeout_while(st, PAUSE_TIMEOUT, |s| !s.parked)
            .unwrap();
        assert!(
            !to.timed_out() && st.parked,
            "no thread reached the pause point"
        );
    }

    /// Lets the parked thread go on.
    pub fn resume(&self) {
        self.state.lock().unwrap().resumed = true;
        self.cv.notify_all();
    }

    fn maybe_park(&self, at: PausePoint) {
        let mut st = self.state.lock().unwrap();
        if st.armed != Some(at) {
            return;
        }
        st.armed = None;
        st.parked = true;
        self.cv.notify_all();
        let (st, to) = self
            .cv
            .wait_timeout_while(st, PAUSE_TIMEOUT, |s| !s.resumed)
            .unwrap();
        assert!(
            !to.timed_out() && st.resumed,
            "the test never resumed the parked thread"
        );
    }
}

/// [`SkipIndex`] with a pause point.
pub struct PausingIndex {
    inner: SkipIndex,
    ctl: Option<Arc<PauseCtl>>,
}

impl AddressIndex for PausingIndex {
    fn new() -> Self {
        PausingIndex {
            inner: SkipIndex::new(),
            ctl: NEXT.with(|n| n.borrow_mut().take()),
        }
    }

    fn insert(&self, key: usize, node: NodeRef) -> Result<(), NodeRef> {
        if let Some(c) = &self.ctl {
            c.maybe_park(PausePoint::Insert(key));
        }
        self.inner.insert(key, node)
    }

    fn remove(&self, key: usize, node: NodeRef) -> bool {
        self.inner.remove(key, node)
    }

    fn get(&self, key: usize) -> Option<NodeRef> {
        self.inner.get(key)
    }

    fn below(&self, key: usize) -> Option<(usize, NodeRef)> {
        self.inner.below(key)
    }

    fn at_or_below(&self, key: usize) -> Option<(usize, NodeRef)> {
        self.inner.at_or_below(key)
    }

    fn for_each_between(&self, lo: usize, hi: usize, f: &mut dyn FnMut(usize, NodeRef) -> bool) {
        self.inner.for_each_between(lo, hi, f)
    }

    fn for_each(&self, f: &mut dyn FnMut(usize, NodeRef) -> bool) {
        self.inner.for_each(f)
    }
}
