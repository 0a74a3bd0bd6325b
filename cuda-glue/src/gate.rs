//! One NCCL call at a time per comm, and frees that never wait.
//!
//! A [`Gate`] guards one comm. A thread that makes a call *claims* it; while
//! it is claimed, jobs that others [`submit`](Gate::submit) (deregistrations
//! from frees) are queued, and the claimant runs them right after its own
//! call, before it lets the comm go. So a free never waits for a
//! registration pass blocked in a collective: it leaves its deregistration
//! to that pass. Only [`call`](Gate::call) (passes, detach) waits, and only
//! for a claimant that is running local deregistrations.
//!
//! The gate's mutex is held for queue operations only, never across a call.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::util::lock;

struct State<J> {
    busy: bool,
    queue: VecDeque<J>,
}

/// Serializes the calls on one comm; see the module docs.
pub(crate) struct Gate<J> {
    state: Mutex<State<J>>,
    idle: Condvar,
}

/// Clears `busy` if the claimant unwinds (a panicking hook in a test), so
/// the comm is not claimed forever. Queued jobs stay for the next claimant.
struct Claim<'a, J> {
    gate: &'a Gate<J>,
    done: bool,
}

impl<J> Drop for Claim<'_, J> {
    fn drop(&mut self) {
        if !self.done {
            let mut st = lock(&self.gate.state);
            st.busy = false;
            drop(st);
            self.gate.idle.notify_all();
        }
    }
}

impl<J> Gate<J> {
    pub(crate) fn new() -> Self {
        Gate {
            state: Mutex::new(State {
                busy: false,
                queue: VecDeque::new(),
            }),
            idle: Condvar::new(),
        }
    }

    /// Runs `job` with `run` now if no call is in flight on the comm; else
    /// queues it for the thread that has one. Never waits for a call.
    /// Returns `true` if the job was queued.
    pub(crate) fn submit(&self, job: J, run: impl Fn(J)) -> bool {
        {
            let mut st = lock(&self.state);
            if st.busy {
                st.queue.push_back(job);
                return true;
            }
            st.busy = true;
        }
        let mut claim = Claim {
            gate: self,
            done: false,
        };
        run(job);
        self.drain(&run, &mut claim);
        false
    }

    /// Waits until no call is in flight, makes the call `f`, then runs every
    /// job queued meanwhile with `run` before letting the comm go.
    pub(crate) fn call<R>(&self, f: impl FnOnce() -> R, run: impl Fn(J)) -> R {
        {
            let mut st = lock(&self.state);
            while st.busy {
                st = wait(&self.idle, st);
            }
            st.busy = true;
        }
        let mut claim = Claim {
            gate: self,
            done: false,
        };
        let r = f();
        self.drain(&run, &mut claim);
        r
    }

    /// Jobs waiting for the current claimant.
    pub(crate) fn queued(&self) -> usize {
        lock(&self.state).queue.len()
    }

    fn drain(&self, run: &impl Fn(J), claim: &mut Claim<'_, J>) {
        loop {
            let job = {
                let mut st = lock(&self.state);
                match st.queue.pop_front() {
                    Some(j) => j,
                    None => {
                        st.busy = false;
                        claim.done = true;
                        drop(st);
                        self.idle.notify_all();
                        return;
                    }
                }
            };
            run(job);
        }
    }
}

fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    use super::*;

    /// A job submitted while a call is in flight waits in the queue and
    /// runs right after that call, on the claimant's thread; the queue is
    /// empty again once the comm is let go.
    #[test]
    fn a_job_submitted_during_a_call_runs_right_after_it() {
        let gate = Gate::new();
        let ran = RefCell::new(Vec::new());
        let run = |j: u32| ran.borrow_mut().push(j);
        assert_eq!(gate.queued(), 0);
        let r = gate.call(
            || {
                assert!(gate.submit(1, |_| unreachable!("queued, not run")));
                assert!(gate.submit(2, |_| unreachable!("queued, not run")));
                assert_eq!(gate.queued(), 2);
                ran.borrow_mut().push(0);
                "answer"
            },
            run,
        );
        assert_eq!(r, "answer");
        assert_eq!(*ran.borrow(), [0, 1, 2]);
        assert_eq!(gate.queued(), 0);
        assert!(!gate.submit(3, run), "no call in flight: runs now");
        assert_eq!(*ran.borrow(), [0, 1, 2, 3]);
    }

    /// A claimant that unwinds lets the comm go: the next submit runs at
    /// once instead of queueing behind a claim nobody holds.
    #[test]
    fn a_claimant_that_panics_lets_the_comm_go() {
        let gate = Gate::<u32>::new();
        let unwound = catch_unwind(AssertUnwindSafe(|| {
            gate.call(|| panic!("a hook panics inside the call"), |_| {})
        }));
        assert!(unwound.is_err());
        let ran = RefCell::new(Vec::new());
        assert!(!gate.submit(7, |j| ran.borrow_mut().push(j)));
        assert_eq!(*ran.borrow(), [7]);
    }
}
