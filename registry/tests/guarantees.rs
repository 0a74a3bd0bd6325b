//! The registry's guarantees (DESIGN.md §1), one module per row of its
//! table and in its order; each test's name starts with the prefix that
//! the table's "test(s)" column cites. Progress and cost are checked by
//! parking callbacks on barriers and by counting steps, never by timing.
#![cfg(not(feature = "loom"))]

use segment_registry::{CommId, PassError, Registry, Segment};

type Reg = Registry<&'static str, u64>;

const MB2: usize = 2 << 20;

fn seg_addr(i: usize) -> usize {
    0x7f00_0000_0000 + i * 4 * MB2
}

/// A pass that registers everything, the window being `seq * 10 + comm`.
fn pass_all_ok(reg: &Reg, comm: CommId) -> Vec<Segment> {
    let report = reg
        .register_pending(comm, |_, s| Ok::<_, ()>(Some(s.seq * 10 + comm.0)))
        .expect("pass");
    assert!(report.handed_back.is_empty());
    report.registered
}

/// A small deterministic generator (xorshift), so that failures replay.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// A guard whose `Drop` runs a pass that stops early (its callback fails,
/// or forgets the comm): what a caller's cleanup code does when an
/// unrelated panic unwinds through it.
struct PassOnDrop<'a> {
    reg: &'a Reg,
    comm: CommId,
    /// The callback forgets the comm on its first segment (the pass then
    /// stops with `Forgotten`) instead of failing with an error.
    forget_in_callback: bool,
    stopped: &'a std::sync::atomic::AtomicBool,
}

impl Drop for PassOnDrop<'_> {
    fn drop(&mut self) {
        let r = self.reg.register_pending(self.comm, |_, s| {
            if self.forget_in_callback {
                let f = self.reg.forget(self.comm).expect("attached");
                assert!(f.pass_running && f.windows.is_empty());
                return Ok(Some(s.seq));
            }
            Err("callback failed")
        });
        let Err(failure) = r else {
            panic!("the pass should stop early")
        };
        let expected = if self.forget_in_callback {
            matches!(failure.error, PassError::Forgotten(_))
        } else {
            matches!(failure.error, PassError::Callback { .. })
        };
        assert!(expected, "{failure:?}");
        // Deregister the hand-backs (nothing to do here) and let go.
        for h in failure.report.handed_back {
            let _ = h.hold.release();
        }
        self.stopped
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Order: a pass visits segments in increasing `seq`, not in address order.
mod order {
    use super::{pass_all_ok, seg_addr, Reg, MB2};

    #[test]
    fn order_passes_visit_segments_in_seq_order() {
        let reg = Reg::new();
        // Track in an address order that differs from the track order.
        let addrs = [seg_addr(5), seg_addr(1), seg_addr(9), seg_addr(3)];
        let segs: Vec<_> = addrs.iter().map(|&a| reg.track(a, MB2).unwrap()).collect();
        assert_eq!(
            segs.iter().map(|s| s.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        let comm = reg.attach("a");
        let visited = pass_all_ok(&reg, comm);
        assert_eq!(visited, segs, "seq order, not address order");
        assert_eq!(reg.segments_by_seq(), segs);
        let mut by_addr = segs.clone();
        by_addr.sort_by_key(|s| s.addr);
        assert_eq!(reg.segments(), by_addr);
    }
}

/// Comms: ids are never reused and grow in attach order; all-comm passes
/// go in that order; a pass on an unattached comm is a typed error.
mod comms {
    use segment_registry::{CommError, CommId, PassError};

    use super::{pass_all_ok, seg_addr, Reg, MB2};

    #[test]
    fn comms_ids_are_never_reused_and_all_comm_passes_go_in_attach_order() {
        let reg = Reg::new();
        let a = reg.attach("a");
        let b = reg.attach("b");
        assert!(reg.forget(a).unwrap().windows.is_empty());
        let c = reg.attach("c");
        assert!(c > b && b > a, "ids grow and are never reused");
        assert_eq!(reg.comms(), vec![b, c]);
        reg.track(seg_addr(0), MB2).unwrap();
        let mut order = Vec::new();
        let results = reg.register_pending_all(|id, payload, _| {
            order.push((id, *payload));
            Ok::<_, ()>(None)
        });
        assert_eq!(results.len(), 2);
        assert_eq!(order, vec![(b, "b"), (c, "c")]);
    }

    #[test]
    fn comms_stats_count_each_comms_windows_and_pending_segments() {
        let reg = Reg::new();
        let (a, b) = (reg.attach("a"), reg.attach("b"));
        for i in 0..3 {
            reg.track(seg_addr(i), MB2).unwrap();
        }
        assert_eq!(pass_all_ok(&reg, a).len(), 3);
        reg.track(seg_addr(3), MB2).unwrap();
        let per_comm = |reg: &Reg| {
            reg.stats()
                .comms
                .iter()
                .map(|c| (c.comm, c.windows, c.pending))
                .collect::<Vec<_>>()
        };
        assert_eq!(per_comm(&reg), [(a, 3, 1), (b, 0, 4)]);
        let n = reg.stats().nodes;
        assert_eq!((n.in_log, n.dead_in_log), (4, 0), "{n:?}");
        drop(reg.untrack(seg_addr(0)).unwrap());
        assert_eq!(per_comm(&reg), [(a, 2, 1), (b, 0, 3)]);
        let n = reg.stats().nodes;
        assert_eq!((n.in_log, n.dead_in_log), (4, 1), "not swept yet: {n:?}");
    }

    #[test]
    fn comms_pass_on_unattached_or_forgotten_comm_is_a_typed_error() {
        let reg = Reg::new();
        let never = CommId(42);
        let err = reg
            .register_pending(never, |_, _| Ok::<_, ()>(None))
            .err()
            .unwrap();
        assert!(matches!(err.error, PassError::Comm(CommError::NotAttached(c)) if c == never));
        let a = reg.attach("a");
        let f = reg.forget(a).unwrap();
        assert!(f.windows.is_empty() && f.free_now.is_empty());
        assert!(!f.pass_running, "no pass was running");
        let err = reg
            .register_pending(a, |_, _| Ok::<_, ()>(None))
            .err()
            .unwrap();
        assert!(matches!(
            err.error,
            PassError::Comm(CommError::NotAttached(_))
        ));
        assert_eq!(reg.forget(a).unwrap_err(), CommError::NotAttached(a));
        assert_eq!(reg.pending(a), Err(CommError::NotAttached(a)));
    }
}

/// Fixed set (`pass_set_*`): a pass's set is fixed when it begins; tracks
/// during it wait for the next pass, untracks during it are still
/// registered (and handed back), untracks before it are not.
mod fixed_set {
    use std::sync::{Arc, Barrier};
    use std::thread;

    use super::{pass_all_ok, seg_addr, Reg, MB2};

    #[test]
    fn pass_set_is_fixed_when_it_begins_tracks_during_it_wait_for_the_next() {
        let reg = Reg::new();
        let comm = reg.attach("a");
        let first = reg.track(seg_addr(0), MB2).unwrap();
        let mut late = None;
        let report = reg
            .register_pending(comm, |_, s| {
                if late.is_none() {
                    late = Some(reg.track(seg_addr(1), MB2).unwrap());
                }
                Ok::<_, ()>(Some(s.seq))
            })
            .unwrap();
        assert_eq!(report.registered, vec![first]);
        assert_eq!(reg.pending(comm), Ok(1));
        let next = pass_all_ok(&reg, comm);
        assert_eq!(next, vec![late.unwrap()]);
    }

    #[test]
    fn pass_set_is_fixed_when_it_begins_untrack_during_it_is_still_registered() {
        let reg = Arc::new(Reg::new());
        let comm = reg.attach("a");
        let s1 = reg.track(seg_addr(0), MB2).unwrap();
        let s2 = reg.track(seg_addr(1), MB2).unwrap();
        let parked = Arc::new(Barrier::new(2));
        let resume = Arc::new(Barrier::new(2));
        let pass = {
            let (reg, parked, resume) = (reg.clone(), parked.clone(), resume.clone());
            thread::spawn(move || {
                let report = reg
                    .register_pending(comm, |_, s| {
                        if s.seq == 1 {
                            parked.wait();
                            resume.wait();
                        }
                        Ok::<_, ()>(Some(s.seq * 100))
                    })
                    .unwrap();
                let registered = report.registered.clone();
                let backs: Vec<_> = report
                    .handed_back
                    .into_iter()
                    .map(|h| (h.segment, h.window, h.hold.release()))
                    .collect();
                (registered, backs, report.free_now)
            })
        };
        parked.wait();
        // The pass is parked inside its first callback: s2 is in its set.
        let gone = reg.untrack(s2.addr).unwrap();
        assert!(gone.windows.is_empty());
        let hold = gone.pass_hold.expect("untrack must report the pass's hold");
        assert!(reg.find(s2.addr).is_none());
        resume.wait();
        let (registered, backs, free_now) = pass.join().unwrap();
        assert_eq!(registered, vec![s1, s2], "s2 was in the set at the begin");
        assert_eq!(backs.len(), 1, "its window comes back from the pass");
        assert_eq!((backs[0].0, backs[0].1), (s2, 200));
        // Exactly one party frees: the pass's hand-back released first, so the
        // untrack's hold is the last one.
        assert!(!backs[0].2);
        assert!(free_now.is_empty());
        assert!(hold.release(), "the last hold frees the memory");
    }

    #[test]
    fn pass_set_is_fixed_when_it_begins_untracked_before_it_is_not_registered() {
        let reg = Reg::new();
        let comm = reg.attach("a");
        let s1 = reg.track(seg_addr(0), MB2).unwrap();
        let s2 = reg.track(seg_addr(1), MB2).unwrap();
        let gone = reg.untrack(s1.addr).unwrap();
        assert!(gone.pass_hold.is_none());
        assert_eq!(pass_all_ok(&reg, comm), vec![s2]);
    }
}

/// Linearizability, the lookups' side (`lookup_finds_*`,
/// `lookup_concurrent_*`, `window_lookup_*`): `find` answers the containing
/// segment at every edge, concurrent readers always find a stable segment
/// and never a stranger, and `window_of` answers every case with a typed
/// result. The loom models (`loom-tests/tests/models/`) explore the races
/// of lookups with untrack, forget and passes.
mod linearizability {
    use std::sync::Arc;
    use std::thread;

    use segment_registry::{CommId, Segment};

    use super::{pass_all_ok, seg_addr, Reg, Rng, MB2};

    #[test]
    fn lookup_finds_the_containing_segment_at_every_edge() {
        let reg = Reg::new();
        let a = reg.track(0x10_0000, 0x1000).unwrap();
        let b = reg.track(0x10_1000, 0x1000).unwrap();
        assert_eq!(reg.find(0x0f_ffff), None);
        assert_eq!(reg.find(0x10_0000), Some(a));
        assert_eq!(reg.find(0x10_0fff), Some(a));
        assert_eq!(reg.find(0x10_1000), Some(b));
        assert_eq!(reg.find(0x10_1fff), Some(b));
        assert_eq!(reg.find(0x10_2000), None);
        assert_eq!(reg.find(0), None);
        assert_eq!(reg.find(usize::MAX), None);
        drop(reg.untrack(a.addr).unwrap());
        assert_eq!(reg.find(0x10_0800), None);
        assert_eq!(reg.find(0x10_1800), Some(b));
    }

    #[test]
    fn lookup_concurrent_readers_always_find_a_stable_segment_and_never_a_stranger() {
        // Each churner owns 8 granules: granule 0 holds a segment that stays
        // tracked throughout; the others are untracked and re-tracked at the
        // same addresses with varying lengths (so slots are withdrawn, replaced
        // and shared). Readers must always find the stable segments, and any
        // segment they find must contain the probed address.
        const CHURNERS: usize = 2;
        const READERS: usize = 2;
        let reg = Arc::new(Reg::new());
        let base = |t: usize| 0x7f00_0000_0000 + t * 8 * MB2;
        let stable: Vec<Segment> = (0..CHURNERS)
            .map(|t| reg.track(base(t), MB2).unwrap())
            .collect();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut churners = Vec::new();
        for t in 0..CHURNERS {
            let reg = reg.clone();
            churners.push(thread::spawn(move || {
                let mut rng = Rng(17 + t as u64);
                for _ in 0..20_000 {
                    let g = 1 + rng.below(6);
                    let addr = base(t) + g * MB2 + [0, MB2 / 2][rng.below(2)];
                    let len = [MB2 / 4, MB2, 2 * MB2][rng.below(3)];
                    if let Ok(s) = reg.track(addr, len) {
                        if rng.below(2) == 0 {
                            drop(reg.untrack(s.addr).unwrap());
                        }
                    }
                    if let Some(s) = reg.find(base(t) + g * MB2 + MB2 / 2) {
                        if rng.below(2) == 0 && s.addr != base(t) {
                            let _ = reg.untrack(s.addr);
                        }
                    }
                }
            }));
        }
        let mut readers = Vec::new();
        for r in 0..READERS {
            let (reg, stop, stable) = (reg.clone(), stop.clone(), stable.clone());
            readers.push(thread::spawn(move || {
                let mut rng = Rng(99 + r as u64);
                let mut found = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = rng.below(CHURNERS);
                    let probe = base(t) + rng.below(8 * MB2);
                    match reg.find(probe) {
                        Some(s) => {
                            assert!(s.contains(probe), "{s:?} does not contain {probe:#x}");
                            found += 1;
                        }
                        None => assert!(
                            !stable[t].contains(probe),
                            "the stable segment {:?} was not found",
                            stable[t]
                        ),
                    }
                }
                found
            }));
        }
        for c in churners {
            c.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
        for s in &stable {
            assert_eq!(reg.find(s.addr + 5), Some(*s));
        }
    }

    #[test]
    fn window_lookup_answers_every_case_with_a_typed_result() {
        use segment_registry::WindowLookupError as E;
        let reg = Reg::new();
        let a = reg.attach("a");
        let b = reg.attach("b");
        let s = reg.track(seg_addr(0), 4 * MB2).unwrap();
        let t = reg.track(seg_addr(1), MB2).unwrap();
        assert_eq!(
            reg.window_of(a, s.addr + 64, 64),
            Err(E::NotRegistered {
                comm: a,
                segment: s
            })
        );
        pass_all_ok(&reg, a);
        // b registers without a window (no symmetric support).
        let _ = reg.register_pending(b, |_, _| Ok::<_, ()>(None)).unwrap();
        let w = reg.window_of(a, s.addr + 0x1234, 0x100).unwrap();
        assert_eq!(
            (w.window, w.offset, w.segment),
            (s.seq * 10 + a.0, 0x1234, s)
        );
        let whole = reg.window_of(a, s.addr, s.len).unwrap();
        assert_eq!(whole.offset, 0);
        assert_eq!(
            reg.window_of(a, s.end() - 8, 16),
            Err(E::CrossesEnd {
                ptr: s.end() - 8,
                size: 16,
                segment: s
            })
        );
        assert_eq!(
            reg.window_of(a, usize::MAX - 1, 16),
            Err(E::NotTracked {
                ptr: usize::MAX - 1
            })
        );
        assert_eq!(
            reg.window_of(b, t.addr, 8),
            Err(E::NoWindow {
                comm: b,
                segment: t
            })
        );
        assert_eq!(
            reg.window_of(CommId(99), s.addr, 8),
            Err(E::NotAttached(CommId(99)))
        );
        // After untrack: not tracked; after forget: not attached.
        let gone = reg.untrack(t.addr).unwrap();
        assert_eq!(gone.windows, vec![(a, t.seq * 10 + a.0)]);
        assert_eq!(
            reg.window_of(a, t.addr, 8),
            Err(E::NotTracked { ptr: t.addr })
        );
        let f = reg.forget(a).unwrap();
        assert_eq!(f.windows.len(), 1);
        for h in f.windows {
            assert!(!h.hold.release());
        }
        assert_eq!(reg.window_of(a, s.addr, 8), Err(E::NotAttached(a)));
        assert_eq!(
            reg.window_of(b, s.addr, 8),
            Err(E::NoWindow {
                comm: b,
                segment: s
            })
        );
    }
}

/// No duplicates: once per comm; a re-tracked address is a new segment.
mod no_duplicates {
    use super::{pass_all_ok, seg_addr, Reg, MB2};

    #[test]
    fn no_duplicates_a_segment_is_registered_once_per_comm_and_a_retrack_is_new() {
        let reg = Reg::new();
        let a = reg.attach("a");
        let b = reg.attach("b");
        let s = reg.track(seg_addr(0), MB2).unwrap();
        assert_eq!(pass_all_ok(&reg, a), vec![s]);
        assert_eq!(
            pass_all_ok(&reg, a),
            vec![],
            "second pass registers nothing"
        );
        assert_eq!(pass_all_ok(&reg, b), vec![s], "each comm once");
        let gone = reg.untrack(s.addr).unwrap();
        assert_eq!(gone.windows.len(), 2);
        let again = reg.track(s.addr, MB2).unwrap();
        assert!(again.seq > s.seq, "a re-tracked address is a new segment");
        assert_eq!(pass_all_ok(&reg, a), vec![again]);
    }
}

/// Exactly-once windows (`exactly_once_*`, `forget_racing_*`): untrack,
/// forget, drain and the pass itself each hand back their windows, none
/// twice, also when forget races a pass.
mod exactly_once_windows {
    use std::sync::{Arc, Barrier};
    use std::thread;

    use segment_registry::PassError;

    use super::{pass_all_ok, seg_addr, Reg, MB2};

    #[test]
    fn exactly_once_windows_untrack_forget_and_drain_each_hand_back_theirs() {
        let reg = Reg::new();
        let a = reg.attach("a");
        let b = reg.attach("b");
        let segs: Vec<_> = (0..4)
            .map(|i| reg.track(seg_addr(i), MB2).unwrap())
            .collect();
        pass_all_ok(&reg, a);
        pass_all_ok(&reg, b);
        let mut back = Vec::new();
        let gone = reg.untrack(segs[0].addr).unwrap();
        back.extend(gone.windows.iter().map(|&(c, w)| (c, w)));
        assert_eq!(gone.windows, vec![(b, 12), (a, 11)]);
        let forgotten = reg.forget(a).unwrap();
        assert!(forgotten.free_now.is_empty());
        for h in forgotten.windows {
            assert_eq!(h.window, h.segment.seq * 10 + a.0);
            back.push((a, h.window));
            assert!(!h.hold.release(), "the segment is still tracked");
        }
        for u in reg.drain() {
            assert!(u.pass_hold.is_none());
            back.extend(u.windows);
        }
        back.sort_unstable();
        let mut expect: Vec<_> = segs
            .iter()
            .flat_map(|s| [(a, s.seq * 10 + 1), (b, s.seq * 10 + 2)])
            .collect();
        expect.sort_unstable();
        assert_eq!(back, expect, "every window once, none twice");
        assert_eq!(reg.stats().live_segments, 0);
    }

    #[test]
    fn forget_racing_a_pass_returns_each_window_exactly_once() {
        for _ in 0..50 {
            let reg = Arc::new(Reg::new());
            let comm = reg.attach("a");
            for i in 0..8 {
                reg.track(seg_addr(i), MB2).unwrap();
            }
            let start = Arc::new(Barrier::new(2));
            let pass = {
                let (reg, start) = (reg.clone(), start.clone());
                thread::spawn(move || {
                    start.wait();
                    let report = match reg.register_pending(comm, |_, s| Ok::<_, ()>(Some(s.seq))) {
                        Ok(r) => r,
                        Err(f) => f.report,
                    };
                    let registered: Vec<u64> = report.registered.iter().map(|s| s.seq).collect();
                    let backs: Vec<u64> = report
                        .handed_back
                        .into_iter()
                        .map(|h| {
                            assert!(!h.hold.release(), "segments stay live");
                            h.window
                        })
                        .collect();
                    (registered, backs)
                })
            };
            start.wait();
            let forgot: Vec<u64> = reg
                .forget(comm)
                .map(|f| {
                    f.windows
                        .into_iter()
                        .map(|h| {
                            assert!(!h.hold.release());
                            h.window
                        })
                        .collect()
                })
                .unwrap_or_default();
            let (mut registered, mut all) = pass.join().unwrap();
            all.extend(forgot);
            all.sort_unstable();
            registered.sort_unstable();
            assert_eq!(all, registered, "each registered window back exactly once");
            for u in reg.drain() {
                assert!(
                    u.windows.is_empty(),
                    "a forgotten comm's window stayed recorded"
                );
            }
        }
    }

    #[test]
    fn forget_racing_a_pass_scripted_inside_its_callback_gets_the_window_from_the_pass() {
        // The race above, scripted: `forget` runs (and returns) inside the
        // callback of the first segment, before the pass records its
        // window. The pass must find the comm forgotten and hand that
        // window back itself; the forget's own report cannot have it.
        let reg = Reg::new();
        let comm = reg.attach("a");
        let s0 = reg.track(seg_addr(0), MB2).unwrap();
        reg.track(seg_addr(1), MB2).unwrap();
        let mut forgot = None;
        let failure = reg
            .register_pending(comm, |_, s| {
                if forgot.is_none() {
                    forgot = Some(reg.forget(comm).expect("attached").windows.len());
                }
                Ok::<_, ()>(Some(s.seq * 10))
            })
            .expect_err("the comm was forgotten during the pass");
        assert!(matches!(failure.error, PassError::Forgotten(c) if c == comm));
        assert_eq!(forgot, Some(0), "forget found no recorded window");
        let backs: Vec<_> = failure
            .report
            .handed_back
            .into_iter()
            .map(|h| {
                assert_eq!(format!("{:?}", h.hold), "Hold", "opaque in logs");
                assert!(!h.hold.release(), "the segment stays live");
                (h.segment, h.window)
            })
            .collect();
        assert_eq!(backs, [(s0, s0.seq * 10)], "the pass hands its window back");
        for u in reg.drain() {
            assert!(u.windows.is_empty(), "no window stays recorded");
        }
    }
}

/// Failure atomicity: a callback error or panic stops the pass, keeps its
/// prefix, and a retry resumes at the failed segment; nothing a panicking
/// pass held is lost; a pass that fails while its thread unwinds lets go
/// of its comm.
mod failure_atomicity {
    use segment_registry::{CommId, Hold, PassError, Segment};

    use super::{pass_all_ok, seg_addr, PassOnDrop, Reg, MB2};

    #[test]
    fn failure_atomicity_error_keeps_the_prefix_and_a_retry_resumes() {
        let reg = Reg::new();
        let comm = reg.attach("a");
        let segs: Vec<_> = (0..5)
            .map(|i| reg.track(seg_addr(i), MB2).unwrap())
            .collect();
        let failure = reg
            .register_pending(comm, |_, s| {
                if s.seq == 3 {
                    Err("nccl said no")
                } else {
                    Ok(Some(s.seq))
                }
            })
            .err()
            .unwrap();
        assert_eq!(failure.report.registered, segs[..2].to_vec());
        let shown = format!("{failure:?}");
        assert!(
            shown.starts_with("PassFailure { error: Callback") && shown.contains("registered: ["),
            "{shown}"
        );
        match failure.error {
            PassError::Callback { segment, error } => {
                assert_eq!(segment, segs[2]);
                assert_eq!(error, "nccl said no");
            }
            e => panic!("unexpected {e:?}"),
        }
        assert_eq!(reg.pending(comm), Ok(3));
        assert_eq!(
            pass_all_ok(&reg, comm),
            segs[2..].to_vec(),
            "resume, no dup"
        );
        // The windows of the first attempt were recorded.
        let gone = reg.untrack(segs[0].addr).unwrap();
        assert_eq!(gone.windows, vec![(comm, 1)]);
    }

    #[test]
    fn failure_atomicity_a_failure_is_an_error_whose_source_is_the_pass_error() {
        let reg = Reg::new();
        let comm = reg.attach("a");
        reg.track(seg_addr(0), MB2).unwrap();
        let failure = reg
            .register_pending(comm, |_, _| Err::<Option<u64>, _>(std::fmt::Error))
            .err()
            .unwrap();
        let source = std::error::Error::source(&failure).expect("the pass error");
        assert_eq!(source.to_string(), failure.error.to_string());
        assert_eq!(failure.to_string(), failure.error.to_string());
    }

    #[test]
    fn failure_atomicity_a_panicking_callback_leaves_the_registry_consistent() {
        let reg = Reg::new();
        let comm = reg.attach("a");
        let segs: Vec<_> = (0..3)
            .map(|i| reg.track(seg_addr(i), MB2).unwrap())
            .collect();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = reg.register_pending(comm, |_, s| {
                if s.seq == 2 {
                    panic!("callback blew up");
                }
                Ok::<_, ()>(Some(s.seq))
            });
        }));
        assert!(r.is_err(), "the panic reaches the caller");
        assert_eq!(reg.pending(comm), Ok(2), "the panicking segment is pending");
        assert_eq!(pass_all_ok(&reg, comm), segs[1..].to_vec());
        let gone = reg.untrack(segs[0].addr).unwrap();
        assert_eq!(gone.windows, vec![(comm, 1)], "no window lost");
    }

    /// Tracks s1 and s2 and runs a pass whose callback untracks s1 while
    /// registering it (window 111) and then panics on s2, so the pass parks
    /// s1's hand-back. Returns s1, s2 and the untrack caller's hold on s1.
    fn panic_after_a_hand_back(reg: &Reg, comm: CommId) -> (Segment, Segment, Hold<'_, u64>) {
        let s1 = reg.track(seg_addr(0), MB2).unwrap();
        let s2 = reg.track(seg_addr(1), MB2).unwrap();
        let mut holds = Vec::new();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = reg.register_pending(comm, |_, s| {
                if s.seq == s1.seq {
                    // Freed while its registration is in flight.
                    let gone = reg.untrack(s1.addr).unwrap();
                    holds.push(gone.pass_hold.expect("the pass holds it"));
                    return Ok::<_, ()>(Some(111));
                }
                panic!("collective failed hard");
            });
        }));
        assert!(r.is_err(), "the panic reaches the caller");
        (s1, s2, holds.pop().expect("s1 was untracked"))
    }

    #[test]
    fn failure_atomicity_a_panic_after_a_hand_back_parks_it_for_the_next_pass() {
        let reg = Reg::new();
        let comm = reg.attach("a");
        let (s1, s2, hold) = panic_after_a_hand_back(&reg, comm);
        // The window of s1 and the duty to free it are not lost: the next pass
        // hands them back.
        let report = reg
            .register_pending(comm, |_, s| Ok::<_, ()>(Some(s.seq)))
            .unwrap();
        assert_eq!(report.registered, vec![s2]);
        assert_eq!(report.handed_back.len(), 1);
        let back = report.handed_back.into_iter().next().unwrap();
        assert_eq!((back.segment, back.window), (s1, 111));
        let untracker_last = hold.release();
        let pass_last = back.hold.release();
        assert!(untracker_last ^ pass_last, "exactly one party frees s1");
    }

    #[test]
    fn failure_atomicity_a_forget_after_a_panicked_pass_hands_back_what_it_parked() {
        let reg = Reg::new();
        let comm = reg.attach("a");
        let (s1, _, hold) = panic_after_a_hand_back(&reg, comm);
        // No pass runs now: forget itself hands back what the panic parked.
        let f = reg.forget(comm).unwrap();
        assert!(!f.pass_running);
        assert_eq!(
            f.windows.len(),
            1,
            "the parked window comes back from forget"
        );
        let back = f.windows.into_iter().next().unwrap();
        assert_eq!((back.segment, back.window), (s1, 111));
        let untracker_last = hold.release();
        assert!(
            untracker_last ^ back.hold.release(),
            "exactly one party frees s1"
        );
    }

    #[test]
    fn failure_atomicity_a_pass_failing_while_the_thread_unwinds_frees_its_comm() {
        let reg = Reg::new();
        let comm = reg.attach("a");
        let segs: Vec<_> = (0..2)
            .map(|i| reg.track(seg_addr(i), MB2).unwrap())
            .collect();
        let stopped = std::sync::atomic::AtomicBool::new(false);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _cleanup = PassOnDrop {
                reg: &reg,
                comm,
                forget_in_callback: false,
                stopped: &stopped,
            };
            panic!("an unrelated panic");
        }));
        assert!(r.is_err() && stopped.load(std::sync::atomic::Ordering::Relaxed));
        // The failed pass must have let go of the comm: the next one runs.
        let report = reg
            .register_pending(comm, |_, s| Ok::<_, ()>(Some(s.seq)))
            .expect("the comm must not stay busy after a pass failed during unwinding");
        assert_eq!(report.registered, segs);
    }
}

/// Progress: passes on one comm are serialized with `Busy`, other comms'
/// passes run, and track, untrack, lookup and iteration never wait for a
/// pass (its callback parked on a barrier, as a collective would block).
mod progress {
    use std::sync::{Arc, Barrier};
    use std::thread;

    use segment_registry::{CommError, PassError};

    use super::{pass_all_ok, seg_addr, Reg, MB2};

    #[test]
    fn progress_passes_on_one_comm_are_serialized_with_busy_and_others_run() {
        let reg = Arc::new(Reg::new());
        let a = reg.attach("a");
        let b = reg.attach("b");
        reg.track(seg_addr(0), MB2).unwrap();
        let parked = Arc::new(Barrier::new(2));
        let resume = Arc::new(Barrier::new(2));
        let t = {
            let (reg, parked, resume) = (reg.clone(), parked.clone(), resume.clone());
            thread::spawn(move || {
                reg.register_pending(a, |_, _| {
                    parked.wait();
                    resume.wait();
                    Ok::<_, ()>(Some(1))
                })
                .map(|r| r.registered.len())
                .ok()
            })
        };
        parked.wait();
        // While a's pass blocks inside its callback (as a collective would):
        let err = reg
            .register_pending(a, |_, _| Ok::<_, ()>(None))
            .err()
            .unwrap();
        assert!(matches!(err.error, PassError::Comm(CommError::Busy(c)) if c == a));
        assert_eq!(pass_all_ok(&reg, b).len(), 1, "another comm's pass runs");
        // track, untrack, lookup and iteration never wait for the pass.
        let s = reg.track(seg_addr(1), MB2).unwrap();
        assert_eq!(reg.find(s.addr + 5), Some(s));
        assert_eq!(reg.segments().len(), 2);
        assert!(reg.untrack(s.addr).is_ok());
        resume.wait();
        assert_eq!(t.join().unwrap(), Some(1));
    }
}

/// Bounded memory: nodes stay proportional to live segments under churn,
/// with a comm that never runs a pass, after a pass lets go of the nodes
/// it held, and after a forgotten comm's pass stopped while unwinding.
mod bounded_memory {
    use segment_registry::CommError;

    use super::{pass_all_ok, seg_addr, PassOnDrop, Reg, MB2};

    #[test]
    fn bounded_memory_churn_with_an_idle_comm_keeps_the_log_short() {
        let reg = Reg::new();
        let busy = reg.attach("busy");
        let _idle = reg.attach("idle-never-passes");
        let live = 100;
        for i in 0..live {
            reg.track(seg_addr(i), MB2).unwrap();
        }
        let mut max_in_log = 0;
        for (round, next) in (live..live + 20_000).enumerate() {
            let victim = seg_addr(next - live);
            drop(reg.untrack(victim).unwrap());
            reg.track(seg_addr(next), MB2).unwrap();
            if round % 1000 == 0 {
                pass_all_ok(&reg, busy);
            }
            if round % 97 == 0 {
                max_in_log = max_in_log.max(reg.stats().nodes.in_log);
            }
        }
        let stats = reg.stats();
        assert_eq!(stats.live_segments, live);
        // live + live/2 (or the slack) + one pinned node per comm, with room
        // for the node that triggers the sweep.
        let bound = live + segment_registry::SWEEP_SLACK.max(live / 2) + 4;
        assert!(max_in_log <= bound, "log grew to {max_in_log} > {bound}");
        reg.flush();
        let n = reg.stats().nodes;
        assert!(n.retired >= 19_000, "{n:?}");
        assert!(n.allocated - n.retired <= bound as u64 + 1, "{n:?}");
    }

    #[test]
    fn bounded_memory_a_watermark_leaving_a_live_node_counts_toward_no_sweep() {
        // Only dead nodes count toward the next sweep (DESIGN.md §9): a pass
        // that moves its watermark off a live segment makes nothing
        // sweepable, so passes alone never bring a sweep forward.
        let reg = Reg::new().with_sweep_slack(8);
        let comm = reg.attach("a");
        for i in 0..20 {
            reg.track(seg_addr(i), MB2).unwrap();
        }
        for i in 20..80 {
            reg.track(seg_addr(i), MB2).unwrap();
            assert_eq!(pass_all_ok(&reg, comm).len(), if i == 20 { 21 } else { 1 });
        }
        // 79 live after it: the threshold is 39; one untrack is one
        // sweepable node, the 60 watermark moves none.
        drop(reg.untrack(seg_addr(0)).unwrap());
        assert_eq!(
            reg.stats().nodes.sweeps,
            0,
            "60 watermark moves counted as dead nodes"
        );
    }

    #[test]
    fn bounded_memory_a_forgotten_comm_leaves_no_pinned_watermark() {
        // Each comm's watermark pins the node its last pass ended at; forget
        // must drop that pin, or each forgotten comm keeps a dead node in the
        // log for good.
        let reg = Reg::new().with_sweep_slack(8);
        for i in 0..50 {
            let c = reg.attach("short-lived");
            reg.track(seg_addr(i), MB2).unwrap();
            assert_eq!(pass_all_ok(&reg, c).len(), 1);
            let f = reg.forget(c).unwrap();
            assert_eq!(f.windows.len(), 1);
            for h in f.windows {
                assert!(!h.hold.release());
            }
            drop(reg.untrack(seg_addr(i)).unwrap());
        }
        drop(
            reg.untrack(reg.track(seg_addr(99), MB2).unwrap().addr)
                .unwrap(),
        );
        let n = reg.stats().nodes;
        assert!(n.sweeps > 0 && n.in_log <= 8 + 3, "{n:?}");
    }

    #[test]
    fn bounded_memory_nodes_held_by_a_pass_are_swept_after_it_lets_go() {
        let reg = Reg::new();
        let comm = reg.attach("a");
        for i in 0..300 {
            reg.track(seg_addr(i), MB2).unwrap();
        }
        let mut first = true;
        let report = reg
            .register_pending(comm, |_, _| {
                if std::mem::take(&mut first) {
                    // Everything in the pass's set dies while the pass holds it.
                    for i in 0..200 {
                        drop(reg.untrack(seg_addr(i)).unwrap());
                    }
                }
                Ok::<_, ()>(None)
            })
            .unwrap();
        assert_eq!(report.registered.len(), 300);
        // The untrack callers dropped their holds at once: the pass held the
        // last ones, so it tells its caller to free them.
        assert_eq!(report.free_now.len(), 200);
        assert!(reg.stats().nodes.dead_in_log >= 190);
        // One more untrack: the nodes the pass let go of are counted and swept.
        drop(reg.untrack(seg_addr(299)).unwrap());
        let n = reg.stats().nodes;
        assert!(n.dead_in_log <= 3, "{n:?}");
    }

    #[test]
    fn bounded_memory_a_pass_stopped_by_forget_while_unwinding_unpins_its_watermark() {
        let reg = Reg::new().with_sweep_slack(0);
        let comm = reg.attach("a");
        for i in 0..2 {
            reg.track(seg_addr(i), MB2).unwrap();
        }
        let stopped = std::sync::atomic::AtomicBool::new(false);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _cleanup = PassOnDrop {
                reg: &reg,
                comm,
                forget_in_callback: true,
                stopped: &stopped,
            };
            panic!("an unrelated panic");
        }));
        assert!(r.is_err() && stopped.load(std::sync::atomic::Ordering::Relaxed));
        assert_eq!(reg.pending(comm), Err(CommError::NotAttached(comm)));
        // The pass stopped after segment 0, which became the watermark; the
        // comm is forgotten, so nothing may keep that node pinned. Two live
        // segments at the end of the log (the sweep keeps the last two), then
        // every earlier one dies: all of them must be swept.
        for i in 2..4 {
            reg.track(seg_addr(i), MB2).unwrap();
        }
        for i in 0..2 {
            let gone = reg.untrack(seg_addr(i)).unwrap();
            assert!(gone.pass_hold.is_none());
        }
        let n = reg.stats().nodes;
        assert_eq!(
            n.dead_in_log, 0,
            "a forgotten comm's watermark is still pinned: {n:?}"
        );
    }
}

/// Cost (`cost_*`, `lookup_page_map_*`): a pass walks O(1) nodes with
/// nothing pending and O(k) for k pending, counted in steps; the page map,
/// which makes lookups O(1), answers as the skiplist does on every layout
/// and whatever the granule.
mod cost {
    use super::{pass_all_ok, seg_addr, Reg, Rng, MB2};

    #[test]
    fn cost_nothing_pending_pass_walks_no_node_and_k_pending_walks_k() {
        let reg = Reg::new();
        let comm = reg.attach("a");
        for i in 0..1000 {
            reg.track(seg_addr(i), MB2).unwrap();
        }
        pass_all_ok(&reg, comm);
        let before = reg.stats().nodes.pass_steps;
        for _ in 0..10 {
            assert!(pass_all_ok(&reg, comm).is_empty());
        }
        assert_eq!(reg.stats().nodes.pass_steps, before, "O(1): no node walked");
        for i in 1000..1025 {
            reg.track(seg_addr(i), MB2).unwrap();
        }
        assert_eq!(pass_all_ok(&reg, comm).len(), 25);
        assert_eq!(
            reg.stats().nodes.pass_steps,
            before + 25,
            "O(k): k nodes walked"
        );
    }

    #[test]
    fn cost_untrack_sweeps_once_max_slack_half_live_nodes_became_sweepable() {
        // DESIGN.md §9: a sweep runs once more than max(slack, live / 2)
        // nodes became sweepable since the last, so each untrack pays an
        // amortized O(1) share. Slack 8, 100 live: the threshold is 50 (of
        // the live count as the untracks leave it).
        let reg = Reg::new().with_sweep_slack(8);
        for i in 0..100 {
            reg.track(seg_addr(i), MB2).unwrap();
        }
        let sweeps = || reg.stats().nodes.sweeps;
        assert_eq!(sweeps(), 0);
        // 33 untracks leave 67 live: 33 <= max(8, 33), no sweep yet.
        for i in 0..33 {
            drop(reg.untrack(seg_addr(i)).unwrap());
        }
        assert_eq!(sweeps(), 0, "not due before the threshold");
        // The 34th makes 34 > max(8, 66 / 2): one sweep, and the count
        // starts again.
        drop(reg.untrack(seg_addr(33)).unwrap());
        assert_eq!(sweeps(), 1, "due past the threshold");
        for i in 34..40 {
            drop(reg.untrack(seg_addr(i)).unwrap());
        }
        assert_eq!(sweeps(), 1, "the count started again from zero");
        // Every node the sweeps retired is freed once the reclaimer runs.
        reg.flush();
        let n = reg.stats().nodes;
        assert!(n.retired >= 30, "{n:?}");
        assert_eq!(n.freed, n.retired, "{n:?}");
    }

    #[test]
    fn lookup_page_map_agrees_with_the_skiplist_and_a_reference_on_every_layout() {
        // Granule-aligned segments (sole slots), unaligned ones sharing granules
        // (counted slots), address reuse (a dead node's slot replaced) and
        // segments beyond the map's reach (2^48 and up), in random churn.
        let with_map = Reg::new();
        let without = Reg::new().with_page_granule(0);
        assert_eq!(with_map.page_granule(), MB2);
        assert_eq!(without.page_granule(), 0);
        let mut reference = std::collections::BTreeMap::<usize, usize>::new();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let bases = [
            0x7f00_0000_0000usize,
            0x1_0000_0000_0000 - 8 * MB2,
            0xffff_0000_0000_0000,
        ];
        let pick_addr = |rng: &mut Rng| {
            let base = bases[rng.below(bases.len())];
            match rng.below(3) {
                0 => base + rng.below(16) * MB2,               // aligned
                1 => base + rng.below(16 * 8) * (MB2 / 8),     // unaligned
                _ => base + rng.below(16 * MB2 / 4096) * 4096, // small pages
            }
        };
        for step in 0..20_000 {
            let addr = pick_addr(&mut rng);
            if step % 3 == 2 {
                // Untrack what contains `addr`, if anything.
                if let Some(s) = with_map.find(addr) {
                    drop(with_map.untrack(s.addr).unwrap());
                    drop(without.untrack(s.addr).unwrap());
                    reference.remove(&s.addr);
                }
            } else {
                let len = [4096, MB2 / 8, MB2, 3 * MB2][rng.below(4)];
                let a = with_map.track(addr, len).map(|s| (s.addr, s.len));
                let b = without.track(addr, len).map(|s| (s.addr, s.len));
                assert_eq!(a.is_ok(), b.is_ok(), "track {addr:#x}+{len:#x}");
                if a.is_ok() {
                    reference.insert(addr, len);
                }
            }
            for _ in 0..4 {
                let probe = pick_addr(&mut rng) + rng.below(MB2);
                let want = reference
                    .range(..=probe)
                    .next_back()
                    .filter(|(&a, &l)| probe < a + l)
                    .map(|(&a, &l)| (a, l));
                let got = with_map.find(probe).map(|s| (s.addr, s.len));
                assert_eq!(got, want, "page map, step {step}, probe {probe:#x}");
                let got = without.find(probe).map(|s| (s.addr, s.len));
                assert_eq!(got, want, "skiplist, step {step}, probe {probe:#x}");
            }
        }
        assert!(!reference.is_empty());
    }

    #[test]
    fn lookup_page_map_granule_is_set_before_or_after_tracking() {
        let reg = Reg::new();
        let a = reg.track(0x7f00_0001_0000, 0x3_0000).unwrap();
        // Changing the granule republishes what is tracked.
        let reg = reg.with_page_granule(64 << 10);
        assert_eq!(reg.page_granule(), 64 << 10);
        assert_eq!(reg.find(0x7f00_0003_ffff), Some(a));
        assert_eq!(reg.find(0x7f00_0004_0000), None);
        let reg = reg.with_page_granule(3 << 20);
        assert_eq!(reg.page_granule(), 4 << 20, "rounded up to a power of two");
        assert_eq!(reg.find(0x7f00_0001_0000), Some(a));
    }
}

/// Overlap: an overlapping range is rejected and never reaches a pass, also
/// when tracks race.
mod overlap {
    use std::sync::{Arc, Barrier};
    use std::thread;

    use segment_registry::{Segment, TrackError};

    use super::{pass_all_ok, seg_addr, Reg, MB2};

    #[test]
    fn overlap_is_rejected_and_never_reaches_a_pass() {
        let reg = Reg::new();
        let comm = reg.attach("a");
        let base = seg_addr(0);
        let s = reg.track(base, 4 * MB2).unwrap();
        for (addr, len) in [
            (base, MB2),               // same start
            (base - MB2, 2 * MB2),     // reaches in from the left
            (base + MB2, MB2),         // inside
            (base + 3 * MB2, 4 * MB2), // sticks out to the right
            (base - MB2, 8 * MB2),     // covers it
            (base + 4 * MB2 - 1, 2),   // last byte
        ] {
            assert_eq!(
                reg.track(addr, len),
                Err(TrackError::Overlap {
                    addr,
                    len,
                    other_addr: base,
                    other_len: 4 * MB2
                })
            );
        }
        // Touching is not overlapping.
        let left = reg.track(base - MB2, MB2).unwrap();
        let right = reg.track(base + 4 * MB2, MB2).unwrap();
        assert_eq!(pass_all_ok(&reg, comm), vec![s, left, right]);
        assert_eq!(reg.stats().live_segments, 3);
    }

    #[test]
    fn overlap_concurrent_tracks_leave_at_most_one_of_each_overlapping_pair() {
        for round in 0..200 {
            let reg = Arc::new(Reg::new());
            let start = Arc::new(Barrier::new(4));
            let base = seg_addr(round);
            // Four ranges that pairwise overlap in a chain.
            let ranges = [
                (base, 2 * MB2),
                (base + MB2, 2 * MB2),
                (base + 2 * MB2, 2 * MB2),
                (base + 3 * MB2 / 2, MB2),
            ];
            let handles: Vec<_> = ranges
                .iter()
                .map(|&(a, l)| {
                    let (reg, start) = (reg.clone(), start.clone());
                    thread::spawn(move || {
                        start.wait();
                        reg.track(a, l).ok()
                    })
                })
                .collect();
            let won: Vec<Segment> = handles
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect();
            for (i, x) in won.iter().enumerate() {
                for y in &won[i + 1..] {
                    assert!(
                        x.end() <= y.addr || y.end() <= x.addr,
                        "round {round}: {x:?} and {y:?} both live"
                    );
                }
            }
            let live = reg.segments();
            assert_eq!(live.len(), won.len());
            let comm = reg.attach("a");
            let mut reg_segs = pass_all_ok(&reg, comm);
            reg_segs.sort_by_key(|s| s.addr);
            assert_eq!(reg_segs, live, "rejected ranges never reach a pass");
        }
    }
}

/// Bad input: a typed error, the registry unchanged.
mod bad_input {
    use segment_registry::{TrackError, UntrackError};

    use super::{seg_addr, Reg, MB2};

    #[test]
    fn bad_input_gets_a_typed_error_and_changes_nothing() {
        let reg = Reg::new();
        let s = reg.track(seg_addr(0), MB2).unwrap();
        let before = (reg.segments(), reg.stats());
        assert_eq!(
            reg.track(0x1000, 0),
            Err(TrackError::ZeroLength { addr: 0x1000 })
        );
        assert_eq!(
            reg.track(usize::MAX - 10, 11),
            Err(TrackError::Overflow {
                addr: usize::MAX - 10,
                len: 11
            })
        );
        assert!(
            reg.track(usize::MAX - 10, 10).is_ok(),
            "ends exactly at the top"
        );
        reg.untrack(usize::MAX - 10).unwrap().windows.clear();
        assert_eq!(
            reg.untrack(s.addr + 1).unwrap_err(),
            UntrackError::Unknown { addr: s.addr + 1 }
        );
        let after = (reg.segments(), reg.stats());
        assert_eq!(before.0, after.0);
        assert_eq!(before.1.live_segments, after.1.live_segments);
        assert!(reg.untrack(s.addr).is_ok());
        assert_eq!(
            reg.untrack(s.addr).unwrap_err(),
            UntrackError::Unknown { addr: s.addr },
            "double untrack"
        );
    }
}
