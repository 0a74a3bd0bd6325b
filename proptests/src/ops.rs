//! The operations of the sequential state machine, how the model and the
//! real registry each run them, and what they return in comparable form.
//!
//! A pass runs a [`PassScript`]: the callback fails, panics or registers
//! without a window at chosen segments, and runs [`Nested`] operations
//! (track, untrack, forget, another pass, …) *inside* the callback, which
//! is how a single thread exercises "untracked while a pass holds it",
//! "forgotten while its pass runs" and "tracked after the pass began".

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};

use segment_registry::{
    CommError, CommId, CommStats, Digest, DigestRange, Divergence, Faults, Hold, NodeCounts,
    PassError, Registry, Segment, Stats, TrackError, UntrackError, Untracked, WindowLookupError,
};

use crate::model::{AddOutcome, CbResult, Model, NextStep, Payload, UntrackOut, Window, WindowAt};

/// The address granule of generated segments (one "slot").
pub const GRANULE: usize = 0x1000;

/// Where [`Op::Churn`] puts its segments, far from the generated slots.
pub const CHURN_BASE: usize = 0x1000_0000;

/// One operation of the state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `track(addr, len)`.
    Track {
        /// Start.
        addr: usize,
        /// Length.
        len: usize,
    },
    /// `untrack(addr)`.
    Untrack {
        /// Start.
        addr: usize,
    },
    /// `find(addr)`.
    Find {
        /// Any address.
        addr: usize,
    },
    /// `attach(payload)`.
    Attach {
        /// The payload.
        payload: Payload,
    },
    /// `forget(comm)`.
    Forget {
        /// The comm.
        comm: CommId,
    },
    /// `pending(comm)`.
    Pending {
        /// The comm.
        comm: CommId,
    },
    /// `register_pending_checked(comm, …)` (or `abstain_checked`) with
    /// simulated peers; every callback returns a window.
    Checked {
        /// The comm.
        comm: CommId,
        /// What the peers answer.
        peers: Peers,
    },
    /// `register_pending(comm, …)` running `script`.
    Pass {
        /// The comm.
        comm: CommId,
        /// What the callback does.
        script: PassScript,
    },
    /// `register_pending_all(…)`: the callback fails at the `k`-th segment
    /// of the `i`-th comm's pass if `fail == Some((i, k))`.
    PassAll {
        /// Where the callback fails.
        fail: Option<(usize, usize)>,
        /// Bit `k`: the `k`-th callback of every pass returns `Ok(None)`.
        no_window: u8,
    },
    /// `window_of(comm, ptr, size)`.
    WindowOf {
        /// The comm.
        comm: CommId,
        /// Any address.
        ptr: usize,
        /// Any size.
        size: usize,
    },
    /// `drain()`.
    Drain,
    /// `n` times track-then-untrack of a fresh segment above
    /// [`CHURN_BASE`]: enough untracks to make the log sweep.
    Churn {
        /// How many.
        n: usize,
    },
}

/// What a pass's callback does, by the index `k` of the call in the pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassScript {
    /// The callback returns `Err(k)` at this call.
    pub fail_at: Option<usize>,
    /// The callback panics at this call.
    pub panic_at: Option<usize>,
    /// Bit `k`: the `k`-th call returns `Ok(None)`.
    pub no_window: u8,
    /// Operations run inside the `k`-th call, before it returns.
    pub nested: Vec<(usize, Nested)>,
    /// After the pass: release the hand-backs' holds before the holds that
    /// nested untracks kept (or after).
    pub handbacks_first: bool,
}

/// An operation run inside a pass callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Nested {
    /// `track(addr, len)`: tracked after the pass began, not in its set.
    Track {
        /// Start.
        addr: usize,
        /// Length.
        len: usize,
    },
    /// `untrack(addr)`, releasing the hold (if any) at once or after the
    /// pass.
    Untrack {
        /// Start.
        addr: usize,
        /// Release the hold inside the callback.
        release_now: bool,
    },
    /// `find(addr)`.
    Find {
        /// Any address.
        addr: usize,
    },
    /// `pending(comm)`.
    Pending {
        /// The comm.
        comm: CommId,
    },
    /// `forget` of the comm whose pass is running.
    ForgetSelf,
    /// `forget(comm)`.
    Forget {
        /// The comm.
        comm: CommId,
    },
    /// A pass for `comm` (the running one gets `Busy`), whose callback
    /// always returns a window.
    Pass {
        /// The comm.
        comm: CommId,
    },
}

/// How a pass ended, in comparable form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PassEnd {
    /// It went through.
    Ok,
    /// It could not start.
    Comm(CommError),
    /// The callback failed on this segment with this code.
    Callback(Segment, u32),
    /// The comm was forgotten while it ran.
    Forgotten(CommId),
    /// The callback panicked (the report is lost with the panic).
    Panicked,
    /// A checked pass's ranks disagreed: nothing registered.
    Diverged(Divergence),
    /// A checked pass's agreement failed with this code.
    Agreement(u32),
}

/// What the simulated peers of a checked pass ([`Op::Checked`]) answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Peers {
    /// They have the same digest: the pass registers.
    Match,
    /// One has one more segment (of 2 MiB) pending.
    OneMore,
    /// One is a checked pass ahead (this rank skipped one).
    Ahead,
    /// This rank abstains (`abstain_checked`).
    Abstain,
    /// The agreement fails (a timeout, say) with this code.
    Fail(u32),
}

impl Peers {
    /// The group's range, given this rank's digest.
    pub fn range(self, local: &Digest) -> DigestRange {
        let peer = match self {
            Peers::OneMore => Digest {
                segments: local.segments + 1,
                bytes: local.bytes.wrapping_add(GRANULE as u64),
                ..*local
            },
            Peers::Ahead => Digest {
                passes: local.passes + 1,
                ..*local
            },
            Peers::Match | Peers::Abstain | Peers::Fail(_) => *local,
        };
        let mut r = local.reduction_input();
        for (x, y) in r.iter_mut().zip(peer.reduction_input()) {
            *x = (*x).max(y);
        }
        Digest::range_from_reduced(r)
    }
}

/// What a pass returned, in comparable form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassOut {
    /// The comm.
    pub comm: CommId,
    /// How it ended.
    pub end: PassEnd,
    /// The segments the callback was called on, in order.
    pub called: Vec<Segment>,
    /// `report.registered`.
    pub registered: Vec<Segment>,
    /// `report.handed_back`: segment, comm, window.
    pub handed_back: Vec<(Segment, CommId, Window)>,
    /// `report.free_now`.
    pub free_now: Vec<Segment>,
    /// Outcomes of the nested operations, with the call they ran in.
    pub nested: Vec<(usize, Outcome)>,
    /// Hold releases after the pass, in order: segment and result.
    pub releases: Vec<(Segment, bool)>,
}

impl PassOut {
    fn new(comm: CommId) -> Self {
        PassOut {
            comm,
            end: PassEnd::Ok,
            called: Vec::new(),
            registered: Vec::new(),
            handed_back: Vec::new(),
            free_now: Vec::new(),
            nested: Vec::new(),
            releases: Vec::new(),
        }
    }
}

/// What `forget` returned: each window with what releasing its hold (at
/// once) returned, in order; `free_now`; and `pass_running`.
pub type ForgetOut = (Vec<(Segment, Window, bool)>, Vec<Segment>, bool);

/// What an operation returned, in comparable form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `track`.
    Track(Result<Segment, TrackError>),
    /// `untrack`, and the result of releasing its hold at once if it had
    /// one and released it.
    Untrack(Result<(UntrackOut, Option<bool>), UntrackError>),
    /// `find`.
    Find(Option<Segment>),
    /// `attach`.
    Attach(CommId),
    /// `forget`: each window, with what releasing its hold (at once)
    /// returned, in address order; and `free_now`.
    Forget(Result<ForgetOut, CommError>),
    /// `pending`.
    Pending(Result<usize, CommError>),
    /// `register_pending`.
    Pass(Box<PassOut>),
    /// A checked pass: the digest its agreement was given (none if it
    /// failed before), and the pass.
    Checked(Option<Digest>, Box<PassOut>),
    /// `register_pending_all`.
    PassAll(Vec<PassOut>),
    /// `window_of`.
    WindowOf(Result<WindowAt, WindowLookupError>),
    /// `drain`.
    Drain(Vec<UntrackOut>),
    /// `Churn`: the segments tracked.
    Churn(Vec<Segment>),
}

impl PassScript {
    fn callback(&self, k: usize, next_window: &Cell<Window>) -> CbResult {
        if self.fail_at == Some(k) {
            CbResult::Fail(k as u32)
        } else if self.panic_at == Some(k) {
            CbResult::Panic
        } else if k < 8 && self.no_window & (1 << k) != 0 {
            CbResult::NoWindow
        } else {
            let w = next_window.get() + 1;
            next_window.set(w);
            CbResult::Window(w)
        }
    }
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// The model side
// ---------------------------------------------------------------------------

/// Runs `op` on the model. `next_window` numbers the windows that
/// callbacks return, in the same order as on the real registry.
pub fn run_model(m: &mut Model, op: &Op, next_window: &Cell<Window>) -> Outcome {
    match *op {
        Op::Track { addr, len } => Outcome::Track(m.track(addr, len)),
        Op::Untrack { addr } => Outcome::Untrack(m.untrack(addr).map(|u| {
            let rel = u.held.then(|| m.release(u.segment.seq));
            (u, rel)
        })),
        Op::Find { addr } => Outcome::Find(m.find(addr)),
        Op::Attach { payload } => Outcome::Attach(m.attach(payload)),
        Op::Forget { comm } => Outcome::Forget(model_forget(m, comm)),
        Op::Pending { comm } => Outcome::Pending(m.pending(comm)),
        Op::Pass { comm, ref script } => {
            Outcome::Pass(Box::new(model_pass(m, comm, script, next_window)))
        }
        Op::Checked { comm, peers } => model_checked(m, comm, peers, next_window),
        Op::PassAll { fail, no_window } => Outcome::PassAll(
            m.attached()
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    let script = PassScript {
                        fail_at: fail.and_then(|(fi, k)| (fi == i).then_some(k)),
                        no_window,
                        ..PassScript::default()
                    };
                    model_pass(m, c, &script, next_window)
                })
                .collect(),
        ),
        Op::WindowOf { comm, ptr, size } => Outcome::WindowOf(m.window_of(comm, ptr, size)),
        Op::Drain => Outcome::Drain(
            m.segments_by_seq()
                .into_iter()
                .map(|s| m.untrack(s.addr).expect("live"))
                .collect(),
        ),
        Op::Churn { n } => Outcome::Churn(
            (0..n)
                .map(|i| {
                    let s = m.track(CHURN_BASE + i * GRANULE, GRANULE).expect("free");
                    m.untrack(s.addr).expect("live");
                    s
                })
                .collect(),
        ),
    }
}

/// Runs a scripted pass on the model, step by step.
pub fn model_pass(
    m: &mut Model,
    comm: CommId,
    script: &PassScript,
    next_window: &Cell<Window>,
) -> PassOut {
    let mut out = PassOut::new(comm);
    if let Err(e) = m.pass_begin(comm) {
        out.end = PassEnd::Comm(e);
        return out;
    }
    model_pass_begun(m, comm, script, next_window, out)
}

/// A checked pass on the model: the digest of the set `pass_begin` fixed,
/// the peers' range, then either the pass (all callbacks return a window)
/// or a stop before any callback.
fn model_checked(m: &mut Model, comm: CommId, peers: Peers, next_window: &Cell<Window>) -> Outcome {
    let mut out = PassOut::new(comm);
    if let Err(e) = m.pass_begin(comm) {
        out.end = PassEnd::Comm(e);
        return Outcome::Checked(None, Box::new(out));
    }
    let set = m.pass(comm).expect("begun").set.clone();
    let c = m.comms.get_mut(&comm).expect("attached");
    let mut local = Digest::of_set(c.checked_passes + 1, &set);
    local.abstain = u64::from(peers == Peers::Abstain);
    let group = peers.range(&local);
    let end =
        match peers {
            Peers::Fail(code) => Some(PassEnd::Agreement(code)),
            _ => {
                c.checked_passes = group.max.passes;
                (!group.agrees() || peers == Peers::Abstain)
                    .then_some(PassEnd::Diverged(Divergence { comm, local, group }))
            }
        };
    let Some(end) = end else {
        let out = model_pass_begun(m, comm, &PassScript::default(), next_window, out);
        return Outcome::Checked(Some(local), Box::new(out));
    };
    m.pass_stop_unagreed(comm);
    let p = m.pass_finish(comm);
    out.free_now = p.report.free_now;
    for h in &p.report.handed_back {
        out.releases.push((h.0, m.release(h.0.seq)));
    }
    out.handed_back = p.report.handed_back;
    out.end = end;
    Outcome::Checked(Some(local), Box::new(out))
}

/// The rest of [`model_pass`], once `pass_begin` succeeded.
fn model_pass_begun(
    m: &mut Model,
    comm: CommId,
    script: &PassScript,
    next_window: &Cell<Window>,
    mut out: PassOut,
) -> PassOut {
    let mut kept: Vec<u64> = Vec::new();
    let mut k = 0;
    while let NextStep::Call(seg) = m.pass_next(comm) {
        out.called.push(seg);
        for (_, n) in script.nested.iter().filter(|(at, _)| *at == k) {
            let o = model_nested(m, comm, n, next_window, &mut kept);
            out.nested.push((k, o));
        }
        let cb = script.callback(k, next_window);
        if m.pass_add(comm, cb) != AddOutcome::Stopped {
            m.pass_release(comm);
        }
        k += 1;
    }
    let p = m.pass_finish(comm);
    out.end = match p.stopped {
        None => PassEnd::Ok,
        Some(crate::model::StopReason::Forgotten) => PassEnd::Forgotten(comm),
        Some(crate::model::StopReason::Callback(s, e)) => PassEnd::Callback(s, e),
        Some(crate::model::StopReason::Panicked(_)) => PassEnd::Panicked,
        Some(crate::model::StopReason::Unagreed) => unreachable!("only model_checked stops so"),
    };
    let report = p.report;
    if out.end == PassEnd::Panicked {
        // The report unwinds with the panic: what it owed is parked on the
        // comm for its next pass or its forget (lost if it is gone).
        m.pass_orphan(comm, report);
    } else {
        out.registered = report.registered;
        out.free_now = report.free_now;
        let hb: Vec<u64> = report.handed_back.iter().map(|h| h.0.seq).collect();
        out.handed_back = report.handed_back;
        let order: Vec<u64> = if script.handbacks_first {
            hb.into_iter().chain(std::mem::take(&mut kept)).collect()
        } else {
            std::mem::take(&mut kept).into_iter().chain(hb).collect()
        };
        for seq in order {
            let seg = m.segs[&seq].seg;
            out.releases.push((seg, m.release(seq)));
        }
    }
    for seq in kept {
        let seg = m.segs[&seq].seg;
        out.releases.push((seg, m.release(seq)));
    }
    out
}

/// `forget` on the model, releasing each window's hold at once.
fn model_forget(m: &mut Model, comm: CommId) -> Result<ForgetOut, CommError> {
    let f = m.forget(comm)?;
    let out = f
        .windows
        .into_iter()
        .map(|(s, w)| (s, w, m.release(s.seq)))
        .collect();
    Ok((out, f.free_now, f.pass_running))
}

fn model_nested(
    m: &mut Model,
    me: CommId,
    n: &Nested,
    next_window: &Cell<Window>,
    kept: &mut Vec<u64>,
) -> Outcome {
    match *n {
        Nested::Track { addr, len } => Outcome::Track(m.track(addr, len)),
        Nested::Untrack { addr, release_now } => Outcome::Untrack(m.untrack(addr).map(|u| {
            let rel = if u.held && release_now {
                Some(m.release(u.segment.seq))
            } else {
                if u.held {
                    kept.push(u.segment.seq);
                }
                None
            };
            (u, rel)
        })),
        Nested::Find { addr } => Outcome::Find(m.find(addr)),
        Nested::Pending { comm } => Outcome::Pending(m.pending(comm)),
        Nested::ForgetSelf => Outcome::Forget(model_forget(m, me)),
        Nested::Forget { comm } => Outcome::Forget(model_forget(m, comm)),
        Nested::Pass { comm } => Outcome::Pass(Box::new(model_pass(
            m,
            comm,
            &PassScript::default(),
            next_window,
        ))),
    }
}

// ---------------------------------------------------------------------------
// The real side
// ---------------------------------------------------------------------------

/// The books the real side keeps, independent of the model: every window
/// comes back exactly once, every segment's memory is freed exactly once,
/// and only after it was untracked.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Windows the callbacks returned.
    pub issued: BTreeSet<Window>,
    /// Windows handed back (by untrack, forget, a pass or drain).
    pub returned: BTreeSet<Window>,
    /// Seqs of every segment tracked.
    pub tracked: BTreeSet<u64>,
    /// Seqs of every segment untracked.
    pub untracked: BTreeSet<u64>,
    /// Seqs of every segment whose memory the caller was told to free.
    pub freed: BTreeSet<u64>,
}

impl Ledger {
    fn issue(&mut self, w: Window) {
        assert!(self.issued.insert(w), "window {w} issued twice");
    }

    fn give_back(&mut self, w: Window) {
        assert!(
            self.issued.contains(&w),
            "window {w} handed back, never issued"
        );
        assert!(self.returned.insert(w), "window {w} handed back twice");
    }

    fn tracked(&mut self, s: &Segment) {
        assert!(self.tracked.insert(s.seq), "seq {} given twice", s.seq);
    }

    fn untracked(&mut self, s: &Segment) {
        assert!(
            self.tracked.contains(&s.seq),
            "untracked {s:?}, never tracked"
        );
        assert!(self.untracked.insert(s.seq), "{s:?} untracked twice");
    }

    fn free(&mut self, s: &Segment) {
        assert!(
            self.untracked.contains(&s.seq),
            "told to free {s:?} while tracked"
        );
        assert!(self.freed.insert(s.seq), "told to free {s:?} twice");
    }

    /// Panics unless every window came back and every untracked segment's
    /// memory was freed.
    pub fn assert_settled(&self) {
        let lost: Vec<_> = self.issued.difference(&self.returned).collect();
        assert!(lost.is_empty(), "windows never handed back: {lost:?}");
        let unfreed: Vec<_> = self.untracked.difference(&self.freed).collect();
        assert!(
            unfreed.is_empty(),
            "untracked seqs never freed: {unfreed:?}"
        );
    }
}

/// The real registry under test, with its ledger.
pub struct Sut {
    /// The registry.
    pub reg: Registry<Payload, Window>,
    next_window: Cell<Window>,
    ledger: RefCell<Ledger>,
}

/// The error a scripted callback returns.
#[derive(Debug)]
pub struct CbError(pub u32);

/// The panic payload of a scripted callback.
pub const CALLBACK_PANIC: &str = "scripted callback panic";

impl Sut {
    /// A fresh registry with these faults switched on.
    pub fn new(faults: Faults) -> Self {
        Self::with_page_granule(faults, segment_registry::DEFAULT_PAGE_GRANULE)
    }

    /// A fresh registry with these faults and this page-map granule.
    pub fn with_page_granule(faults: Faults, granule: usize) -> Self {
        Sut {
            reg: Registry::with_faults(faults).with_page_granule(granule),
            next_window: Cell::new(0),
            ledger: RefCell::new(Ledger::default()),
        }
    }

    /// The ledger so far.
    pub fn ledger(&self) -> std::cell::Ref<'_, Ledger> {
        self.ledger.borrow()
    }

    fn untracked(&self, u: &Untracked<'_, Window>) -> UntrackOut {
        let mut l = self.ledger.borrow_mut();
        l.untracked(&u.segment);
        for (_, w) in &u.windows {
            l.give_back(*w);
        }
        if u.pass_hold.is_none() {
            l.free(&u.segment);
        }
        UntrackOut {
            segment: u.segment,
            windows: sorted(u.windows.clone()),
            held: u.pass_hold.is_some(),
        }
    }

    fn release(&self, seg: Segment, hold: Hold<'_, Window>) -> bool {
        let last = hold.release();
        if last {
            self.ledger.borrow_mut().free(&seg);
        }
        last
    }

    fn track(&self, addr: usize, len: usize) -> Result<Segment, TrackError> {
        let r = self.reg.track(addr, len);
        if let Ok(s) = &r {
            self.ledger.borrow_mut().tracked(s);
        }
        r
    }

    fn forget(&self, comm: CommId) -> Result<ForgetOut, CommError> {
        let f = self.reg.forget(comm)?;
        let mut out = Vec::new();
        for hb in f.windows {
            assert_eq!(hb.comm, comm, "forget hands back its own comm's windows");
            self.ledger.borrow_mut().give_back(hb.window);
            out.push((hb.segment, hb.window, self.release(hb.segment, hb.hold)));
        }
        for s in &f.free_now {
            self.ledger.borrow_mut().free(s);
        }
        Ok((out, f.free_now, f.pass_running))
    }

    /// Runs `op` on the registry.
    pub fn run(&self, op: &Op) -> Outcome {
        match *op {
            Op::Track { addr, len } => Outcome::Track(self.track(addr, len)),
            Op::Untrack { addr } => Outcome::Untrack(self.reg.untrack(addr).map(|mut u| {
                let out = self.untracked(&u);
                let rel = u.pass_hold.take().map(|h| self.release(u.segment, h));
                (out, rel)
            })),
            Op::Find { addr } => Outcome::Find(self.reg.find(addr)),
            Op::Attach { payload } => Outcome::Attach(self.reg.attach(payload)),
            Op::Forget { comm } => Outcome::Forget(self.forget(comm)),
            Op::Pending { comm } => Outcome::Pending(self.reg.pending(comm)),
            Op::Pass { comm, ref script } => Outcome::Pass(Box::new(self.pass(comm, script, 0))),
            Op::Checked { comm, peers } => self.checked(comm, peers),
            Op::PassAll { fail, no_window } => {
                let order = self.reg.comms();
                let calls = RefCell::new(Vec::<(CommId, Segment)>::new());
                let results = self.reg.register_pending_all(|c, _, seg| {
                    let i = order.iter().position(|&o| o == c).expect("attached");
                    let mut calls = calls.borrow_mut();
                    let k = calls.iter().filter(|(o, _)| *o == c).count();
                    calls.push((c, *seg));
                    let script = PassScript {
                        fail_at: fail.and_then(|(fi, k)| (fi == i).then_some(k)),
                        no_window,
                        ..PassScript::default()
                    };
                    self.callback_result(&script, k)
                });
                let calls = calls.into_inner();
                Outcome::PassAll(
                    order
                        .iter()
                        .zip(results)
                        .map(|(&c, r)| {
                            let mut out = PassOut::new(c);
                            out.called = calls.iter().filter(|x| x.0 == c).map(|x| x.1).collect();
                            self.pass_result(&mut out, r, true);
                            out
                        })
                        .collect(),
                )
            }
            Op::WindowOf { comm, ptr, size } => Outcome::WindowOf(
                self.reg
                    .window_of(comm, ptr, size)
                    .map(|w| (w.window, w.offset, w.segment)),
            ),
            Op::Drain => Outcome::Drain(
                self.reg
                    .drain()
                    .into_iter()
                    .map(|mut u| {
                        let out = self.untracked(&u);
                        if let Some(h) = u.pass_hold.take() {
                            self.release(u.segment, h);
                        }
                        out
                    })
                    .collect(),
            ),
            Op::Churn { n } => Outcome::Churn(
                (0..n)
                    .map(|i| {
                        let s = self
                            .track(CHURN_BASE + i * GRANULE, GRANULE)
                            .expect("churn range is free");
                        let u = self.reg.untrack(s.addr).expect("just tracked");
                        self.untracked(&u);
                        s
                    })
                    .collect(),
            ),
        }
    }

    fn callback_result(&self, script: &PassScript, k: usize) -> Result<Option<Window>, CbError> {
        match script.callback(k, &self.next_window) {
            CbResult::Fail(e) => Err(CbError(e)),
            CbResult::Panic => std::panic::panic_any(CALLBACK_PANIC),
            CbResult::NoWindow => Ok(None),
            CbResult::Window(w) => {
                self.ledger.borrow_mut().issue(w);
                Ok(Some(w))
            }
        }
    }

    fn checked(&self, comm: CommId, peers: Peers) -> Outcome {
        let mut out = PassOut::new(comm);
        let seen = Cell::new(None);
        let agree = |_: &Payload, d: &Digest| {
            seen.set(Some(*d));
            match peers {
                Peers::Fail(code) => Err(CbError(code)),
                _ => Ok(peers.range(d)),
            }
        };
        let r = if peers == Peers::Abstain {
            Err(self.reg.abstain_checked(comm, agree))
        } else {
            let mut k = 0;
            self.reg.register_pending_checked(comm, agree, |_, seg| {
                out.called.push(*seg);
                let r = self.callback_result(&PassScript::default(), k);
                k += 1;
                r
            })
        };
        for (seg, h) in self.pass_result(&mut out, r, false) {
            out.releases.push((seg, self.release(seg, h)));
        }
        Outcome::Checked(seen.get(), Box::new(out))
    }

    fn pass(&self, comm: CommId, script: &PassScript, depth: usize) -> PassOut {
        let mut out = PassOut::new(comm);
        let mut kept: Vec<(Segment, Hold<'_, Window>)> = Vec::new();
        let mut nested = Vec::new();
        let mut called = Vec::new();
        let r = catch_unwind(AssertUnwindSafe(|| {
            let mut k = 0;
            self.reg.register_pending(comm, |_, seg| {
                called.push(*seg);
                if depth == 0 {
                    for (_, n) in script.nested.iter().filter(|(at, _)| *at == k) {
                        let o = self.nested(comm, n, &mut kept);
                        nested.push((k, o));
                    }
                }
                let r = self.callback_result(script, k);
                k += 1;
                r
            })
        }));
        out.called = called;
        out.nested = nested;
        match r {
            Ok(r) => {
                let hb = self.pass_result(&mut out, r, false);
                let mut order = Vec::new();
                let kept = std::mem::take(&mut kept);
                if script.handbacks_first {
                    order.extend(hb);
                    order.extend(kept);
                } else {
                    order.extend(kept);
                    order.extend(hb);
                }
                for (seg, h) in order {
                    out.releases.push((seg, self.release(seg, h)));
                }
            }
            Err(payload) => {
                assert_eq!(
                    payload.downcast_ref::<&str>(),
                    Some(&CALLBACK_PANIC),
                    "the callback's own panic reaches the caller"
                );
                out.end = PassEnd::Panicked;
            }
        }
        for (seg, h) in kept {
            out.releases.push((seg, self.release(seg, h)));
        }
        out
    }

    /// Fills `out` from a pass result; returns the hand-backs' holds (or
    /// releases them at once if `release_now`).
    fn pass_result<'r>(
        &'r self,
        out: &mut PassOut,
        r: segment_registry::PassResult<'r, Window, CbError>,
        release_now: bool,
    ) -> Vec<(Segment, Hold<'r, Window>)> {
        let report = match r {
            Ok(report) => report,
            Err(f) => {
                out.end = match f.error {
                    PassError::Comm(e) => PassEnd::Comm(e),
                    PassError::Callback { segment, error } => PassEnd::Callback(segment, error.0),
                    PassError::Forgotten(c) => PassEnd::Forgotten(c),
                    PassError::Diverged(d) => PassEnd::Diverged(*d),
                    PassError::Agreement { error, .. } => PassEnd::Agreement(error.0),
                };
                f.report
            }
        };
        assert_eq!(report.comm, out.comm, "report names its comm");
        out.registered = report.registered;
        out.free_now = report.free_now;
        for s in &out.free_now {
            self.ledger.borrow_mut().free(s);
        }
        let mut holds = Vec::new();
        for hb in report.handed_back {
            self.ledger.borrow_mut().give_back(hb.window);
            out.handed_back.push((hb.segment, hb.comm, hb.window));
            if release_now {
                out.releases
                    .push((hb.segment, self.release(hb.segment, hb.hold)));
            } else {
                holds.push((hb.segment, hb.hold));
            }
        }
        holds
    }

    fn nested<'r>(
        &'r self,
        me: CommId,
        n: &Nested,
        kept: &mut Vec<(Segment, Hold<'r, Window>)>,
    ) -> Outcome {
        match *n {
            Nested::Track { addr, len } => Outcome::Track(self.track(addr, len)),
            Nested::Untrack { addr, release_now } => {
                Outcome::Untrack(self.reg.untrack(addr).map(|mut u| {
                    let out = self.untracked(&u);
                    let rel = match u.pass_hold.take() {
                        Some(h) if release_now => Some(self.release(u.segment, h)),
                        Some(h) => {
                            kept.push((u.segment, h));
                            None
                        }
                        None => None,
                    };
                    (out, rel)
                }))
            }
            Nested::Find { addr } => Outcome::Find(self.reg.find(addr)),
            Nested::Pending { comm } => Outcome::Pending(self.reg.pending(comm)),
            Nested::ForgetSelf => Outcome::Forget(self.forget(me)),
            Nested::Forget { comm } => Outcome::Forget(self.forget(comm)),
            Nested::Pass { comm } => {
                Outcome::Pass(Box::new(self.pass(comm, &PassScript::default(), 1)))
            }
        }
    }

    /// Untracks everything and forgets every comm; then every window must
    /// have come back and every segment's memory been freed.
    pub fn settle(&self) {
        self.run(&Op::Drain);
        for c in self.reg.comms() {
            self.forget(c).expect("attached");
        }
        self.ledger.borrow().assert_settled();
        let st = self.reg.stats();
        assert_eq!((st.live_segments, st.live_bytes), (0, 0));
        assert!(st.comms.is_empty());
    }
}

// ---------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------

/// Everything observable about a registry at rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// `segments()`.
    pub segments: Vec<Segment>,
    /// `segments_by_seq()`.
    pub by_seq: Vec<Segment>,
    /// `comms()`, each with `payload` and `pending`.
    pub comms: Vec<(CommId, Option<Payload>, Result<usize, CommError>)>,
    /// `find` at the start, middle, last byte and end of each segment, and
    /// one byte below it.
    pub finds: Vec<(usize, Option<Segment>)>,
    /// `window_of(comm, start, 1)` for every attached comm and segment.
    pub lookups: Vec<Result<WindowAt, WindowLookupError>>,
    /// `stats()`.
    pub stats: Stats,
}

impl Snapshot {
    /// Takes a snapshot of `reg`.
    pub fn of(reg: &Registry<Payload, Window>) -> Self {
        let segments = reg.segments();
        let finds = segments
            .iter()
            .flat_map(probe_addrs)
            .map(|a| (a, reg.find(a)))
            .collect();
        let lookups = reg
            .comms()
            .into_iter()
            .flat_map(|c| segments.iter().map(move |s| (c, s.addr)))
            .map(|(c, a)| {
                reg.window_of(c, a, 1)
                    .map(|w| (w.window, w.offset, w.segment))
            })
            .collect();
        Snapshot {
            lookups,
            by_seq: reg.segments_by_seq(),
            comms: reg
                .comms()
                .into_iter()
                .map(|c| (c, reg.payload(c), reg.pending(c)))
                .collect(),
            finds,
            stats: reg.stats(),
            segments,
        }
    }

    /// What the model says the snapshot is. Freed-node counts depend on the
    /// epoch reclaimer, so they are copied from `freed`; without a log
    /// model, all node counts are copied from `nodes`.
    pub fn expected(m: &Model, nodes: NodeCounts) -> Self {
        let segments = m.segments();
        let finds = segments
            .iter()
            .flat_map(probe_addrs)
            .map(|a| (a, m.find(a)))
            .collect();
        let nodes = match &m.log {
            None => nodes,
            Some(log) => NodeCounts {
                allocated: log.allocated,
                retired: log.retired,
                freed: nodes.freed,
                in_log: log.nodes.len(),
                dead_in_log: log.nodes.iter().filter(|n| n.1).count(),
                sweeps: log.sweeps,
                pass_steps: log.pass_steps,
            },
        };
        let comms: Vec<CommId> = m.attached();
        let lookups = comms
            .iter()
            .flat_map(|&c| segments.iter().map(move |s| (c, s.addr)))
            .map(|(c, a)| m.window_of(c, a, 1))
            .collect();
        Snapshot {
            lookups,
            by_seq: m.segments_by_seq(),
            comms: comms
                .iter()
                .map(|&c| (c, Some(m.comms[&c].payload), m.pending(c)))
                .collect(),
            finds,
            stats: Stats {
                live_segments: m.live_count(),
                live_bytes: m.live_bytes(),
                comms: comms
                    .iter()
                    .map(|&c| CommStats {
                        comm: c,
                        windows: m.windows_of(c),
                        pending: m.pending(c).expect("attached"),
                    })
                    .collect(),
                nodes,
            },
            segments,
        }
    }
}

/// Addresses worth a `find` around a segment: start, middle, last byte,
/// one past the end, one below the start.
pub fn probe_addrs(s: &Segment) -> [usize; 5] {
    [
        s.addr,
        s.addr + s.len / 2,
        s.end() - 1,
        s.end(),
        s.addr.wrapping_sub(1),
    ]
}
