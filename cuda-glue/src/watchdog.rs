//! The stall reporter for calls that nothing may end: a call on a borrowed
//! *blocking* comm blocks inside NCCL, where neither its thread (which is
//! inside the call) nor any other (an abort would free the comm under it)
//! can safely release it. Before such a call the allocator registers a
//! [`Watch`]; one process-wide thread wakes at the earliest deadline and,
//! for a call still running then, writes one log line (the comm, the
//! call, the time waited) to stderr, bumps the allocator's `stalls`
//! counter and keeps the message as its last error. The call goes on; the
//! watch ends when it returns.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use segment_registry::CommId;

use crate::backend::RawComm;
use crate::stats::{bump, Counters};
use crate::util::lock;

/// What a watch names: a call on a comm (formatted only if reported, so
/// that watching costs a calling thread no allocation).
#[derive(Clone, Copy)]
pub(crate) enum Watched {
    /// An NCCL call on an attached comm.
    Call(&'static str, CommId, RawComm),
    /// The split of a checked attach.
    Split(RawComm),
}

impl std::fmt::Display for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Watched::Call(call, id, raw) => write!(f, "{call} on {id} ({raw:?})"),
            Watched::Split(raw) => write!(f, "ncclCommSplit of {raw:?} (a checked attach)"),
        }
    }
}

/// Where a report goes: the allocator's counters and last-error slot.
#[derive(Clone)]
pub(crate) struct Sink {
    pub(crate) counters: Arc<Counters>,
    pub(crate) last_error: Arc<Mutex<Option<String>>>,
}

impl Sink {
    /// Reports a stall: one line to stderr, the counter, the last error.
    pub(crate) fn report(&self, what: &str, waited: Duration, deadline: Duration) {
        let msg = format!(
            "segment-registry: {what} has waited {waited:.1?}, past its deadline of {deadline:?}; \
             the comm is blocking and not the glue's, so nothing can end the call safely: it \
             goes on (check that every rank makes the same registrations at the same point)"
        );
        eprintln!("{msg}");
        bump(&self.counters.stalls);
        *lock(&self.last_error) = Some(msg);
    }
}

/// A call being watched.
struct Watch {
    started: Instant,
    deadline: Duration,
    what: Watched,
    sink: Sink,
    reported: bool,
}

#[derive(Default)]
struct Watches {
    next: u64,
    live: HashMap<u64, Watch>,
    thread: bool,
}

/// The process-wide watchdog: the watches and the thread's wake-up.
#[derive(Default)]
struct Watchdog {
    watches: Mutex<Watches>,
    changed: Condvar,
}

fn watchdog() -> &'static Watchdog {
    static DOG: OnceLock<Watchdog> = OnceLock::new();
    DOG.get_or_init(Watchdog::default)
}

/// Ends its watch when dropped (the call returned).
pub(crate) struct WatchGuard(u64);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        lock(&watchdog().watches).live.remove(&self.0);
    }
}

/// Watches the call `what` that should end within `deadline`, until the
/// guard drops.
pub(crate) fn watch(what: Watched, deadline: Duration, sink: Sink) -> WatchGuard {
    let dog = watchdog();
    let mut w = lock(&dog.watches);
    let id = w.next;
    w.next += 1;
    w.live.insert(
        id,
        Watch {
            started: Instant::now(),
            deadline,
            what,
            sink,
            reported: false,
        },
    );
    if !w.thread {
        let spawned = std::thread::Builder::new()
            .name("segreg-watchdog".into())
            .spawn(|| run(watchdog()));
        // Without the thread, stalls go unreported (and nothing else changes).
        w.thread = spawned.is_ok();
    }
    drop(w);
    dog.changed.notify_all();
    WatchGuard(id)
}

/// The watchdog thread: sleeps until the earliest unreported deadline,
/// reports every watch past its own, and never exits.
fn run(dog: &Watchdog) {
    let mut w = lock(&dog.watches);
    loop {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        for watch in w.live.values_mut().filter(|x| !x.reported) {
            let due = watch.started + watch.deadline;
            if due <= now {
                watch.reported = true;
                let what = watch.what.to_string();
                watch
                    .sink
                    .report(&what, now - watch.started, watch.deadline);
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        w = match next {
            None => dog.changed.wait(w).unwrap_or_else(|e| e.into_inner()),
            Some(due) => {
                let nap = due.saturating_duration_since(Instant::now());
                dog.changed
                    .wait_timeout(w, nap)
                    .map_or_else(|e| e.into_inner().0, |(g, _)| g)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::get;

    fn sink() -> Sink {
        Sink {
            counters: Arc::new(Counters::default()),
            last_error: Arc::new(Mutex::new(None)),
        }
    }

    /// The watchdog reports a call still running past its deadline, once,
    /// and names it; not a call that returned before its deadline, nor one
    /// whose deadline is still ahead.
    #[test]
    fn only_a_call_still_running_past_its_deadline_is_reported() {
        let (late, long, done) = (sink(), sink(), sink());
        let short = Duration::from_millis(100);
        let _late = watch(Watched::Split(RawComm(0x3)), short, late.clone());
        let _long = watch(
            Watched::Split(RawComm(0x1)),
            Duration::from_secs(3600),
            long.clone(),
        );
        drop(watch(Watched::Split(RawComm(0x2)), short, done.clone()));
        std::thread::sleep(4 * short);
        assert_eq!(get(&late.counters.stalls), 1);
        let msg = lock(&late.last_error).clone().unwrap();
        assert!(
            msg.starts_with(
                "segment-registry: ncclCommSplit of RawComm(0x3) (a checked attach) has waited"
            ) && msg.contains("past its deadline of 100ms"),
            "{msg}"
        );
        assert_eq!(get(&long.counters.stalls), 0, "its deadline is ahead");
        assert_eq!(get(&done.counters.stalls), 0, "it returned in time");
        assert!(lock(&done.last_error).is_none());
    }
}
