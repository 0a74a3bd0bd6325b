//! The sequential reference model: the registry's specification written
//! with plain maps, one step at a time.
//!
//! Every public method is one atomic step of the specification. A
//! registration pass is *not* one step: it is [`Model::pass_claim`] (the
//! comm becomes busy), [`Model::pass_fix_end`] (segments tracked later are
//! not in its set) and one [`Model::pass_walk`] step per segment up to that
//! end (a segment joins the set, and is held, if it is still tracked when
//! the walk reaches it); then, per segment, [`Model::pass_next`] (the "was
//! the comm forgotten?" check before the callback), [`Model::pass_add`]
//! (what the pass does with the callback's result) and
//! [`Model::pass_release`] (it lets go of the segment before); and finally
//! [`Model::pass_finish_cursor`], one [`Model::pass_finish_release`] per
//! hold left, and [`Model::pass_finish_unbusy`]. `forget` is likewise
//! [`Model::forget_begin`], [`Model::forget_flag`] and one
//! [`Model::forget_take`] per window. The sequential state machine runs
//! the steps of one operation back to back (with nested operations between
//! them, inside the callback); the linearizability checker lets other
//! threads' operations fall between any two of them.
//!
//! The model also tracks *holds* (who still needs an untracked segment's
//! memory) and, optionally, the registry's log of nodes ([`LogModel`]) so
//! that [`segment_registry::NodeCounts`] can be predicted exactly.

use std::collections::{BTreeMap, BTreeSet};

use segment_registry::{
    CommError, CommId, Segment, TrackError, UntrackError, WindowLookupError, SWEEP_SLACK,
};

/// The window handle the tests use: a unique number per successful
/// registration callback.
pub type Window = u64;

/// The comm payload the tests use.
pub type Payload = u64;

/// One segment the model knows: live, or untracked but still held.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SegModel {
    /// The segment as tracked.
    pub seg: Segment,
    /// Whether it is still tracked.
    pub live: bool,
    /// The windows recorded for it, one per comm.
    pub windows: BTreeMap<CommId, Window>,
    /// Comms it is registered with without a window (`Ok(None)`).
    pub no_window: BTreeSet<CommId>,
    /// Holds on its memory: passes that hold it, untrack callers and
    /// hand-backs that have not released theirs.
    pub holds: u32,
}

/// A running registration pass.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PassModel {
    /// The set fixed at begin, in seq order.
    pub set: Vec<Segment>,
    /// Index in `set` of the next segment to register.
    pub next: usize,
    /// The last segment registered and whether the pass still holds it
    /// (it does unless its hold moved into a hand-back).
    pub last_done: Option<(Segment, bool)>,
    /// The seq of the last log node when the pass began (`None` when the
    /// watermark was already the last node).
    pub end: Option<u64>,
    /// The last seq the walk that fixes the set has decided.
    pub walked: u64,
    /// Whether that walk is still going on.
    pub walking: bool,
    /// Whether every segment of the set went through.
    pub complete: bool,
    /// Why the pass stopped, if it did.
    pub stopped: Option<StopReason>,
    /// What the pass has reported so far.
    pub report: PassReportModel,
    /// Releases still to do in the finish (filled by
    /// [`Model::pass_finish_cursor`]).
    pub to_release: Vec<(Segment, bool)>,
}

/// Why a pass stopped early.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// The callback failed on this segment with this error.
    Callback(Segment, u32),
    /// The comm was forgotten.
    Forgotten,
    /// The callback panicked on this segment.
    Panicked(Segment),
    /// A checked pass's agreement stopped it before any callback.
    Unagreed,
}

/// The report a pass builds up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PassReportModel {
    /// Segments registered, in callback order.
    pub registered: Vec<Segment>,
    /// Windows handed back instead of recorded.
    pub handed_back: Vec<(Segment, CommId, Window)>,
    /// Untracked segments whose last hold the pass released.
    pub free_now: Vec<Segment>,
}

/// One comm: attached, or forgotten while its pass still runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CommModel {
    /// The payload it was attached with.
    pub payload: Payload,
    /// `false` once `forget` took it out of the comm table.
    pub attached: bool,
    /// `true` once `forget` flagged it (a running pass stops at its next
    /// check, and hands back what it registers). Set just after
    /// `attached` goes `false`.
    pub forgotten: bool,
    /// The watermark: every segment with a larger seq is pending.
    pub cursor: u64,
    /// What a pass whose callback panicked could not report: its
    /// hand-backs (each still holding its segment) and its frees, handed
    /// back by the next pass on the comm or by `forget`.
    pub orphans: (Vec<(Segment, CommId, Window)>, Vec<Segment>),
    /// The running pass, if any.
    pub pass: Option<PassModel>,
    /// Checked passes taken part in (the digest's `passes`).
    pub checked_passes: u64,
}

/// The registry's log of nodes, for exact node counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LogModel {
    /// Linked nodes after the sentinel: seq and whether untracked.
    pub nodes: Vec<(u64, bool)>,
    /// Untracks since the last sweep.
    pub unswept: usize,
    /// Nodes allocated (tracks that got past the length checks).
    pub allocated: u64,
    /// Nodes handed to the reclaimer.
    pub retired: u64,
    /// Sweeps run.
    pub sweeps: u64,
    /// Log nodes visited by pass begins.
    pub pass_steps: u64,
}

/// What `window_of` finds: the window, the offset into the segment, and
/// the segment (`WindowRef` as a tuple: the registry does not export that
/// type's name).
pub type WindowAt = (Window, usize, Segment);

/// What `forget` returns.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ForgetModel {
    /// Windows, each with a hold: orphans first, then in address order.
    pub windows: Vec<(Segment, Window)>,
    /// Frees owed (orphans).
    pub free_now: Vec<Segment>,
    /// Whether a pass was running.
    pub pass_running: bool,
}

/// What an untrack returns, in comparable form.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UntrackOut {
    /// The segment.
    pub segment: Segment,
    /// Its windows, sorted by comm.
    pub windows: Vec<(CommId, Window)>,
    /// Whether a pass still held it (`pass_hold.is_some()`).
    pub held: bool,
}

/// What the next step of a pass is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NextStep {
    /// Call the callback on this segment.
    Call(Segment),
    /// The loop is over (all done, or stopped because the comm was
    /// forgotten); run the finish steps.
    Finish,
}

/// What the callback returned, as the model sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CbResult {
    /// `Ok(Some(window))`.
    Window(Window),
    /// `Ok(None)`: registered without a window.
    NoWindow,
    /// `Err(code)`.
    Fail(u32),
    /// The callback panicked.
    Panic,
}

/// What [`Model::pass_add`] decided for the segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddOutcome {
    /// The window was recorded (or there was none).
    Recorded,
    /// The window was handed back (segment untracked, or comm forgotten).
    HandedBack,
    /// The callback failed or panicked: the pass stops.
    Stopped,
}

/// The sequential specification of the registry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Model {
    /// Every segment that is live or still held, by seq.
    pub segs: BTreeMap<u64, SegModel>,
    /// The seq of the last successful track.
    pub last_seq: u64,
    /// The id of the last attached comm.
    pub last_comm: u64,
    /// Attached comms, and forgotten ones whose pass still runs.
    pub comms: BTreeMap<CommId, CommModel>,
    /// The log, when node counts are checked.
    pub log: Option<LogModel>,
}

impl Model {
    /// An empty registry; `with_log` also models the log's nodes.
    pub fn new(with_log: bool) -> Self {
        Model {
            log: with_log.then(LogModel::default),
            ..Model::default()
        }
    }

    /// Live segments in address order.
    pub fn segments(&self) -> Vec<Segment> {
        let mut v = self.segments_by_seq();
        v.sort_by_key(|s| s.addr);
        v
    }

    /// Live segments in seq order.
    pub fn segments_by_seq(&self) -> Vec<Segment> {
        self.segs
            .values()
            .filter(|s| s.live)
            .map(|s| s.seg)
            .collect()
    }

    /// Number of live segments.
    pub fn live_count(&self) -> usize {
        self.segs.values().filter(|s| s.live).count()
    }

    /// Bytes in live segments.
    pub fn live_bytes(&self) -> usize {
        self.segs
            .values()
            .filter(|s| s.live)
            .map(|s| s.seg.len)
            .sum()
    }

    /// Attached comms in attach order.
    pub fn attached(&self) -> Vec<CommId> {
        self.comms
            .iter()
            .filter(|(_, c)| c.attached)
            .map(|(&id, _)| id)
            .collect()
    }

    /// The live segment starting at exactly `addr`.
    fn live_at(&self, addr: usize) -> Option<u64> {
        self.segs
            .values()
            .find(|s| s.live && s.seg.addr == addr)
            .map(|s| s.seg.seq)
    }

    /// The live segment an overlapping track of `[addr, end)` is rejected
    /// for. The registry promises only *a* live segment it overlaps; the
    /// model names the one its scan meets first in a quiescent registry:
    /// the one at the same start, else the predecessor if it reaches in,
    /// else the lowest-addressed one that starts inside the range.
    pub fn overlap(&self, addr: usize, end: usize) -> Option<Segment> {
        let live: Vec<Segment> = self.segments();
        if let Some(s) = live.iter().find(|s| s.addr == addr) {
            return Some(*s);
        }
        if let Some(p) = live.iter().rev().find(|s| s.addr < addr) {
            if p.end() > addr {
                return Some(*p);
            }
        }
        live.iter().find(|s| s.addr > addr && s.addr < end).copied()
    }

    /// `track(addr, len)`.
    pub fn track(&mut self, addr: usize, len: usize) -> Result<Segment, TrackError> {
        if len == 0 {
            return Err(TrackError::ZeroLength { addr });
        }
        let end = addr
            .checked_add(len)
            .ok_or(TrackError::Overflow { addr, len })?;
        if let Some(log) = &mut self.log {
            log.allocated += 1;
        }
        if let Some(o) = self.overlap(addr, end) {
            if let Some(log) = &mut self.log {
                log.retired += 1;
            }
            return Err(TrackError::Overlap {
                addr,
                len,
                other_addr: o.addr,
                other_len: o.len,
            });
        }
        self.last_seq += 1;
        let seg = Segment {
            addr,
            len,
            seq: self.last_seq,
        };
        self.segs.insert(
            seg.seq,
            SegModel {
                seg,
                live: true,
                windows: BTreeMap::new(),
                no_window: BTreeSet::new(),
                holds: 0,
            },
        );
        if let Some(log) = &mut self.log {
            log.nodes.push((seg.seq, false));
        }
        Ok(seg)
    }

    /// `untrack(addr)`. A `held` result means the caller now has a hold to
    /// release with [`Model::release`].
    pub fn untrack(&mut self, addr: usize) -> Result<UntrackOut, UntrackError> {
        let seq = self.live_at(addr).ok_or(UntrackError::Unknown { addr })?;
        let s = self.segs.get_mut(&seq).expect("live");
        s.live = false;
        let windows: Vec<(CommId, Window)> = std::mem::take(&mut s.windows).into_iter().collect();
        let held = s.holds > 0;
        let segment = s.seg;
        if held {
            s.holds += 1;
        } else {
            self.segs.remove(&seq);
        }
        let live = self.live_count();
        if let Some(log) = &mut self.log {
            for n in &mut log.nodes {
                if n.0 == seq {
                    n.1 = true;
                }
            }
            log.unswept += 1;
            if log.unswept > SWEEP_SLACK.max(live / 2) {
                self.sweep();
            }
        }
        Ok(UntrackOut {
            segment,
            windows,
            held,
        })
    }

    /// Watermark pins on the node with this seq.
    fn pins(&self, seq: u64) -> usize {
        self.comms
            .values()
            .map(|c| {
                usize::from(c.cursor == seq)
                    + usize::from(c.pass.as_ref().is_some_and(|p| p.end == Some(seq)))
            })
            .sum()
    }

    fn holds(&self, seq: u64) -> u32 {
        self.segs.get(&seq).map_or(0, |s| s.holds)
    }

    /// The sweep: unlinks every untracked node that nothing holds or pins,
    /// except the last two.
    fn sweep(&mut self) {
        let Some(log) = &self.log else { return };
        let n = log.nodes.len();
        let keep: Vec<bool> = log
            .nodes
            .iter()
            .enumerate()
            .map(|(i, &(seq, dead))| {
                i + 2 >= n || !dead || self.holds(seq) > 0 || self.pins(seq) > 0
            })
            .collect();
        let log = self.log.as_mut().expect("checked");
        log.unswept = 0;
        log.sweeps += 1;
        let before = log.nodes.len();
        let mut it = keep.iter();
        log.nodes.retain(|_| *it.next().expect("same length"));
        log.retired += (before - log.nodes.len()) as u64;
    }

    /// [`Model::release`], or `None` if nobody holds `seq` (a wrong guess
    /// of the linearizability checker).
    pub fn try_release(&mut self, seq: u64) -> Option<bool> {
        if self.segs.get(&seq).is_some_and(|s| s.holds > 0) {
            Some(self.release(seq))
        } else {
            None
        }
    }

    /// Holds on the segment `seq` (0 if unknown).
    pub fn holds_of(&self, seq: u64) -> u32 {
        self.holds(seq)
    }

    /// Releases one hold on the segment `seq`; `true` if it was the last
    /// hold on an untracked segment (its memory may now be freed).
    pub fn release(&mut self, seq: u64) -> bool {
        let s = self
            .segs
            .get_mut(&seq)
            .unwrap_or_else(|| panic!("model: release of seq {seq} that nobody holds"));
        assert!(s.holds > 0, "model: release of seq {seq} without a hold");
        s.holds -= 1;
        if s.holds == 0 && !s.live {
            self.segs.remove(&seq);
            if self.pins(seq) == 0 {
                // The node just became sweepable.
                if let Some(log) = &mut self.log {
                    log.unswept += 1;
                }
            }
            true
        } else {
            false
        }
    }

    /// A watermark or pass end let go of the node `seq` (the pin is already
    /// gone from the model): if that was its last pin and nothing holds the
    /// untracked node, it just became sweepable.
    fn unpinned(&mut self, seq: u64) {
        let dead = self
            .log
            .as_ref()
            .is_some_and(|l| l.nodes.iter().any(|&(s, d)| s == seq && d));
        if dead && self.pins(seq) == 0 && self.holds(seq) == 0 {
            if let Some(log) = &mut self.log {
                log.unswept += 1;
            }
        }
    }

    /// `find(addr)`: the live segment containing `addr`.
    pub fn find(&self, addr: usize) -> Option<Segment> {
        self.segs
            .values()
            .find(|s| s.live && s.seg.contains(addr))
            .map(|s| s.seg)
    }

    /// `window_of(comm, ptr, size)`: window, offset and segment.
    pub fn window_of(
        &self,
        comm: CommId,
        ptr: usize,
        size: usize,
    ) -> Result<WindowAt, WindowLookupError> {
        let attached = self.comms.get(&comm).is_some_and(|c| c.attached);
        let Some(segment) = self.find(ptr) else {
            return Err(if attached {
                WindowLookupError::NotTracked { ptr }
            } else {
                WindowLookupError::NotAttached(comm)
            });
        };
        let fits = matches!(ptr.checked_add(size), Some(end) if end <= segment.end());
        if !fits {
            return Err(WindowLookupError::CrossesEnd { ptr, size, segment });
        }
        let s = &self.segs[&segment.seq];
        if let Some(&window) = s.windows.get(&comm) {
            return Ok((window, ptr - segment.addr, segment));
        }
        Err(if !attached {
            WindowLookupError::NotAttached(comm)
        } else if s.no_window.contains(&comm) {
            WindowLookupError::NoWindow { comm, segment }
        } else {
            WindowLookupError::NotRegistered { comm, segment }
        })
    }

    /// `attach(payload)`.
    pub fn attach(&mut self, payload: Payload) -> CommId {
        self.last_comm += 1;
        let id = CommId(self.last_comm);
        self.comms.insert(
            id,
            CommModel {
                payload,
                attached: true,
                forgotten: false,
                cursor: 0,
                orphans: (Vec::new(), Vec::new()),
                pass: None,
                checked_passes: 0,
            },
        );
        id
    }

    fn attached_comm(&self, id: CommId) -> Result<&CommModel, CommError> {
        self.comms
            .get(&id)
            .filter(|c| c.attached)
            .ok_or(CommError::NotAttached(id))
    }

    /// `forget(id)`: the windows it held, in address order, each with a
    /// hold on its segment (release them with [`Model::release`]).
    pub fn forget(&mut self, id: CommId) -> Result<ForgetModel, CommError> {
        self.forget_begin(id)?;
        let (pass_running, orphans) = self.forget_flag(id);
        let mut windows: Vec<(Segment, Window)> =
            orphans.0.into_iter().map(|(s, _, w)| (s, w)).collect();
        for s in self.segments() {
            if let Some(w) = self.forget_take(id, s.seq) {
                windows.push((s, w));
            }
        }
        Ok(ForgetModel {
            windows,
            free_now: orphans.1,
            pass_running,
        })
    }

    /// The first step of `forget(id)`: the comm leaves the comm table
    /// (lookups fail from now on).
    pub fn forget_begin(&mut self, id: CommId) -> Result<(), CommError> {
        self.attached_comm(id)?;
        self.comms.get_mut(&id).expect("checked").attached = false;
        Ok(())
    }

    /// The second step of `forget(id)`: the comm is flagged forgotten (a
    /// pass still running for it stops at its next check); without a
    /// running pass it is gone, and its orphans (see
    /// [`CommModel::orphans`]) are handed back. Returns whether a pass was
    /// running, and the orphans.
    #[allow(clippy::type_complexity)]
    pub fn forget_flag(
        &mut self,
        id: CommId,
    ) -> (bool, (Vec<(Segment, CommId, Window)>, Vec<Segment>)) {
        let c = self.comms.get_mut(&id).expect("forget began");
        c.forgotten = true;
        if c.pass.is_some() {
            return (true, (Vec::new(), Vec::new()));
        }
        let c = self.comms.remove(&id).expect("present");
        self.unpinned(c.cursor);
        (false, c.orphans)
    }

    /// One step of `forget(id)`'s scan: takes the comm's window of the
    /// live segment `seq`, with a hold on it.
    pub fn forget_take(&mut self, id: CommId, seq: u64) -> Option<Window> {
        let s = self.segs.get_mut(&seq).filter(|s| s.live)?;
        s.no_window.remove(&id);
        let w = s.windows.remove(&id)?;
        s.holds += 1;
        Some(w)
    }

    /// `pending(id)`.
    pub fn pending(&self, id: CommId) -> Result<usize, CommError> {
        let c = self.attached_comm(id)?;
        Ok(self
            .segs
            .values()
            .filter(|s| s.live && s.seg.seq > c.cursor)
            .count())
    }

    /// Windows recorded for live segments, for this comm.
    pub fn windows_of(&self, id: CommId) -> usize {
        self.segs
            .values()
            .filter(|s| s.live && s.windows.contains_key(&id))
            .count()
    }

    /// Whether a pass for `id` is running.
    pub fn busy(&self, id: CommId) -> bool {
        self.comms.get(&id).is_some_and(|c| c.pass.is_some())
    }

    fn pass_mut(&mut self, id: CommId) -> &mut PassModel {
        self.comms
            .get_mut(&id)
            .and_then(|c| c.pass.as_mut())
            .unwrap_or_else(|| panic!("model: no pass running for {id}"))
    }

    /// The running pass of `id`, if any.
    pub fn pass(&self, id: CommId) -> Option<&PassModel> {
        self.comms.get(&id).and_then(|c| c.pass.as_ref())
    }

    /// A pass's begin, all at once: [`Model::pass_claim`],
    /// [`Model::pass_fix_end`], then every [`Model::pass_walk`] step.
    pub fn pass_begin(&mut self, id: CommId) -> Result<(), CommError> {
        self.pass_claim(id)?;
        let cursor = self.comms[&id].cursor;
        self.pass_fix_end(id);
        if let (Some(log), Some(end)) = (
            &mut self.log,
            self.comms[&id].pass.as_ref().and_then(|p| p.end),
        ) {
            log.pass_steps += log
                .nodes
                .iter()
                .filter(|&&(seq, _)| seq > cursor && seq <= end)
                .count() as u64;
        }
        while self.pass_walk(id) {}
        Ok(())
    }

    /// The first step of a pass: the comm must be attached and idle; it
    /// becomes busy. (Between the two steps of a forget, a pass that looked
    /// the comm up before it left the table still starts: the claim checks
    /// the forgotten flag.)
    pub fn pass_claim(&mut self, id: CommId) -> Result<(), CommError> {
        let c = self
            .comms
            .get(&id)
            .filter(|c| !c.forgotten)
            .ok_or(CommError::NotAttached(id))?;
        if c.pass.is_some() {
            return Err(CommError::Busy(id));
        }
        let cursor = c.cursor;
        let c = self.comms.get_mut(&id).expect("checked");
        let (handed_back, free_now) = std::mem::take(&mut c.orphans);
        c.pass = Some(PassModel {
            set: Vec::new(),
            next: 0,
            last_done: None,
            end: None,
            walked: cursor,
            walking: false,
            complete: false,
            stopped: None,
            report: PassReportModel {
                registered: Vec::new(),
                handed_back,
                free_now,
            },
            to_release: Vec::new(),
        });
        Ok(())
    }

    /// The pass reads the end of the log: segments tracked from now on are
    /// not in its set.
    pub fn pass_fix_end(&mut self, id: CommId) {
        let last = self.last_seq;
        let cursor = self.comms[&id].cursor;
        let p = self.pass_mut(id);
        if last > cursor {
            p.end = Some(last);
            p.walking = true;
        }
    }

    /// One step of the walk that fixes the set: the next segment after the
    /// watermark and up to the end joins the set (and is held) if it is
    /// still tracked when the walk reaches it. `false` once the walk is
    /// over.
    pub fn pass_walk(&mut self, id: CommId) -> bool {
        let p = self.pass(id).expect("pass running");
        if !p.walking {
            return false;
        }
        let (from, end) = (p.walked, p.end.expect("walking"));
        let next = self
            .segs
            .range(from + 1..)
            .next()
            .filter(|(&seq, _)| seq <= end)
            .map(|(&seq, s)| (seq, s.live));
        let p = self.pass_mut(id);
        let Some((seq, live)) = next else {
            p.walking = false;
            return false;
        };
        p.walked = seq;
        if live {
            let seg = self.segs.get_mut(&seq).expect("known");
            seg.holds += 1;
            let seg = seg.seg;
            self.pass_mut(id).set.push(seg);
        }
        true
    }

    /// Whether the pass's walk is still fixing its set.
    pub fn pass_walking(&self, id: CommId) -> bool {
        self.pass(id).is_some_and(|p| p.walking)
    }

    /// The check at the top of the pass loop: the next segment to call the
    /// callback on, or [`NextStep::Finish`] (the set is done, or the comm
    /// was forgotten: then the pass stops).
    pub fn pass_next(&mut self, id: CommId) -> NextStep {
        let attached = !self.comms[&id].forgotten;
        let p = self.pass_mut(id);
        if p.stopped.is_some() || p.next >= p.set.len() {
            if p.stopped.is_none() {
                p.complete = true;
            }
            return NextStep::Finish;
        }
        if !attached {
            p.stopped = Some(StopReason::Forgotten);
            return NextStep::Finish;
        }
        NextStep::Call(p.set[p.next])
    }

    /// What the pass does with the callback's result for the current
    /// segment: record the window, hand it back, or stop.
    pub fn pass_add(&mut self, id: CommId, cb: CbResult) -> AddOutcome {
        let attached = !self.comms[&id].forgotten;
        let p = self.pass_mut(id);
        let seg = p.set[p.next];
        let window = match cb {
            CbResult::Fail(e) => {
                p.stopped = Some(StopReason::Callback(seg, e));
                return AddOutcome::Stopped;
            }
            CbResult::Panic => {
                p.stopped = Some(StopReason::Panicked(seg));
                return AddOutcome::Stopped;
            }
            CbResult::NoWindow => None,
            CbResult::Window(w) => Some(w),
        };
        p.report.registered.push(seg);
        let s = self
            .segs
            .get_mut(&seg.seq)
            .expect("a held segment is known");
        let outcome = match window {
            None => {
                if s.live && attached {
                    s.no_window.insert(id);
                }
                AddOutcome::Recorded
            }
            Some(w) if !s.live || !attached => {
                // Untracked while the pass held it, or the comm was
                // forgotten: the window comes back from the pass, which
                // moves its hold into the hand-back.
                self.pass_mut(id).report.handed_back.push((seg, id, w));
                AddOutcome::HandedBack
            }
            Some(w) => {
                let dup = s.windows.insert(id, w);
                assert!(dup.is_none(), "model: {seg:?} registered twice with {id}");
                AddOutcome::Recorded
            }
        };
        let p = self.pass_mut(id);
        p.to_release = p.last_done.take().into_iter().collect();
        p.last_done = Some((seg, outcome == AddOutcome::Recorded));
        p.next += 1;
        outcome
    }

    /// After [`Model::pass_add`]: the pass lets go of the segment before
    /// (it kept it as a watermark candidate). Returns the segment if this
    /// was its last hold on an untracked segment (reported in `free_now`).
    pub fn pass_release(&mut self, id: CommId) -> Option<Segment> {
        let p = self.pass_mut(id);
        let prev = std::mem::take(&mut p.to_release);
        let mut freed = None;
        for (seg, owns) in prev {
            if owns && self.release(seg.seq) {
                self.pass_mut(id).report.free_now.push(seg);
                freed = Some(seg);
            }
        }
        freed
    }

    /// The first finish step: the watermark moves (to the end of the set
    /// if it all went through, else past what was registered); the holds
    /// to drop are queued.
    pub fn pass_finish_cursor(&mut self, id: CommId) {
        let c = self.comms.get_mut(&id).expect("pass running");
        let p = c.pass.as_mut().expect("pass running");
        // The pass's pin on the end of its set goes onto the watermark, or
        // away; the old watermark's pin goes.
        let mut unpinned = Vec::new();
        if let Some(end) = p.end.take() {
            if p.complete {
                unpinned.push(std::mem::replace(&mut c.cursor, end));
            } else {
                unpinned.push(end);
                if let Some((seg, _)) = p.last_done {
                    unpinned.push(std::mem::replace(&mut c.cursor, seg.seq));
                }
            }
        }
        for seq in unpinned {
            self.unpinned(seq);
        }
        let p = self.pass_mut(id);
        let mut rel: Vec<(Segment, bool)> = p.last_done.take().into_iter().collect();
        rel.extend(p.set[p.next.min(p.set.len())..].iter().map(|&s| (s, true)));
        p.to_release = rel;
    }

    /// Whether a finish release is still to do.
    pub fn pass_finish_has_release(&self, id: CommId) -> bool {
        self.pass(id).is_some_and(|p| !p.to_release.is_empty())
    }

    /// One finish step: drop the next queued hold. Returns the segment if it
    /// was the last hold on an untracked segment.
    pub fn pass_finish_release(&mut self, id: CommId) -> Option<Segment> {
        let p = self.pass_mut(id);
        let (seg, owns) = p.to_release.remove(0);
        if owns && self.release(seg.seq) {
            self.pass_mut(id).report.free_now.push(seg);
            Some(seg)
        } else {
            None
        }
    }

    /// The last finish step: the comm is no longer busy (and a forgotten
    /// comm disappears). Returns the finished pass.
    pub fn pass_finish_unbusy(&mut self, id: CommId) -> PassModel {
        let c = self.comms.get_mut(&id).expect("pass running");
        let p = c.pass.take().expect("pass running");
        assert!(p.to_release.is_empty(), "model: finish releases left");
        if c.forgotten {
            let c = self.comms.remove(&id).expect("present");
            self.unpinned(c.cursor);
        }
        p
    }

    /// After a pass whose callback panicked finished: what its report owed
    /// becomes the comm's orphans. Returns `false` if the comm was
    /// forgotten meanwhile (nobody can hand them back).
    pub fn pass_orphan(&mut self, id: CommId, report: PassReportModel) -> bool {
        match self.comms.get_mut(&id) {
            Some(c) => {
                c.orphans.0.extend(report.handed_back);
                c.orphans.1.extend(report.free_now);
                true
            }
            None => false,
        }
    }

    /// A checked pass that may not register: it stops before any callback.
    pub fn pass_stop_unagreed(&mut self, id: CommId) {
        self.pass_mut(id).stopped = Some(StopReason::Unagreed);
    }

    /// All finish steps at once (the sequential machine's way).
    pub fn pass_finish(&mut self, id: CommId) -> PassModel {
        self.pass_finish_cursor(id);
        while self.pass_finish_has_release(id) {
            self.pass_finish_release(id);
        }
        self.pass_finish_unbusy(id)
    }
}
