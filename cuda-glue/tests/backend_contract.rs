//! The `Backend` trait's contract outside any one backend: the defaults a
//! backend written before the checked calls inherits, the forwarding
//! through `Box` and `Arc`, `Wait`'s deadline and its action, and the
//! handles' `Debug` forms that logs and error messages print.
#![cfg(not(feature = "loom"))]

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use segment_registry_nccl::sim::SimWorld;
use segment_registry_nccl::{
    AbortHook, Allocator, AtDeadline, Backend, BackendError, CommOwner, RawComm, Wait, Window,
    MIN_NCCL_VERSION,
};

/// A backend with only the required calls: memory and windows.
struct Minimal;

impl Backend for Minimal {
    fn name(&self) -> &'static str {
        "minimal"
    }
    fn mem_alloc(&self, _size: usize, _device: i32) -> Result<usize, BackendError> {
        Ok(0x1000)
    }
    fn mem_free(&self, _ptr: usize) -> Result<(), BackendError> {
        Ok(())
    }
    fn comm_window_register_within(
        &self,
        _comm: RawComm,
        _ptr: usize,
        _size: usize,
        _flags: i32,
        _wait: &Wait<'_>,
    ) -> Result<Option<Window>, BackendError> {
        Ok(None)
    }
    fn comm_window_deregister_within(
        &self,
        _comm: RawComm,
        _window: Window,
        _wait: &Wait<'_>,
    ) -> Result<(), BackendError> {
        Ok(())
    }
}

fn unsupported(call: &'static str) -> BackendError {
    BackendError::Unsupported {
        call,
        backend: "minimal",
    }
}

/// Every call added for checked comms answers `Unsupported` by default,
/// naming the call and the backend, and the version is the oldest the glue
/// accepts: such a backend still serves unchecked comms, and refuses a
/// checked one with a message that says what is missing.
#[test]
fn a_backend_with_only_the_required_calls_refuses_the_checked_ones_by_name() {
    let b = Minimal;
    let comm = RawComm(0x10);
    let wait = Wait::unbounded();
    assert_eq!(b.nccl_version(), MIN_NCCL_VERSION);
    assert_eq!(b.comm_split(comm, &wait), Err(unsupported("ncclCommSplit")));
    assert_eq!(
        b.comm_async_error(comm),
        Err(unsupported("ncclCommGetAsyncError"))
    );
    assert_eq!(b.comm_abort(comm), Err(unsupported("ncclCommAbort")));
    assert_eq!(
        b.comm_release(comm, &wait),
        Err(unsupported("ncclCommDestroy"))
    );
    assert_eq!(b.all_reduce_setup(comm), Err(unsupported("ncclAllReduce")));
    let mut words = [1u64];
    assert_eq!(
        b.all_reduce_max_u64(comm, &mut words, &wait),
        Err(unsupported("ncclAllReduce"))
    );
    assert_eq!(
        unsupported("ncclCommAbort").to_string(),
        "ncclCommAbort is not supported by the minimal backend"
    );
}

/// `Box<B>` and `Arc<B>` are backends that forward every call: the
/// simulated rank's answers come back unchanged through both.
#[test]
fn boxed_and_shared_backends_forward_every_call() {
    let world = SimWorld::new(1);
    let direct = world.rank(0).unwrap();
    let boxed: Box<dyn Backend> = Box::new(world.rank(0).unwrap());
    let shared: Arc<dyn Backend> = Arc::new(world.rank(0).unwrap());
    let comm = world.comm_create(&[0]).unwrap()[0];
    for b in [&boxed as &dyn Backend, &shared as &dyn Backend] {
        assert_eq!(b.name(), direct.name());
        assert_eq!(b.nccl_version(), direct.nccl_version());
        let wait = Wait::unbounded();
        let p = b.mem_alloc(2 << 20, 0).unwrap();
        let w = b
            .comm_window_register_within(comm, p, 2 << 20, 1, &wait)
            .unwrap()
            .expect("the simulator gives a window");
        assert_eq!(world.stats().live_windows, 1);
        b.comm_window_deregister_within(comm, w, &wait).unwrap();
        assert_eq!(world.stats().live_windows, 0);
        b.mem_free(p).unwrap();
        let child = b.comm_split(comm, &wait).unwrap();
        assert!(!child.is_null());
        b.comm_async_error(child).unwrap();
        b.all_reduce_setup(child).unwrap();
        let mut words = [7u64, 2];
        b.all_reduce_max_u64(child, &mut words, &wait).unwrap();
        assert_eq!(words, [7, 2], "one rank: the max is its own words");
        b.all_reduce_teardown(child);
        b.comm_release(child, &wait).unwrap();
        let doomed = b.comm_split(comm, &wait).unwrap();
        let aborts = world.stats().aborts;
        b.comm_abort(doomed).unwrap();
        assert_eq!(world.stats().aborts, aborts + 1);
    }
    assert_eq!(world.stats().live_allocs, 0);
    assert!(world.verify().is_empty(), "{:?}", world.verify());
}

/// The deadline is what the wait was made with; before it, `check` is
/// `None` and the action does not run; `aborted` says only what an action
/// answered.
#[test]
fn a_wait_reports_its_deadline_and_fires_nothing_before_it() {
    assert_eq!(Wait::unbounded().deadline(), None);
    assert_eq!(Wait::unbounded().remaining(), None);
    let hour = Duration::from_secs(3600);
    assert_eq!(Wait::give_up_after(hour).deadline(), Some(hour));
    let ran = Cell::new(0);
    let action = |_| {
        ran.set(ran.get() + 1);
        AtDeadline::Aborted
    };
    let w = Wait::new(hour, &action);
    assert_eq!(w.deadline(), Some(hour));
    assert_eq!(w.check(), None, "an hour has not passed");
    assert_eq!(ran.get(), 0);
    assert!(!w.aborted());
    assert!(w.remaining().unwrap() > Duration::from_secs(3000));
    assert_eq!(Wait::unbounded().check(), None);
    assert!(!Wait::unbounded().aborted());
}

/// Past the deadline the action runs once, its answer stays, and only an
/// `Aborted` answer makes the wait `aborted`; a wait without an action
/// answers `Aborted`.
#[test]
fn past_its_deadline_a_wait_runs_its_action_once() {
    let ran = Cell::new(0);
    let keep = |_| {
        ran.set(ran.get() + 1);
        AtDeadline::KeepWaiting
    };
    let w = Wait::new(Duration::ZERO, &keep);
    assert_eq!(w.check(), Some(AtDeadline::KeepWaiting));
    assert_eq!(w.check(), Some(AtDeadline::KeepWaiting));
    assert_eq!(ran.get(), 1, "the action runs once");
    assert!(!w.aborted(), "the stall was reported, nothing aborted");
    assert_eq!(w.remaining(), Some(Duration::ZERO));

    let abort = |_| AtDeadline::Aborted;
    let w = Wait::new(Duration::ZERO, &abort);
    assert!(!w.aborted(), "not before the action ran");
    assert_eq!(w.check(), Some(AtDeadline::Aborted));
    assert!(w.aborted());

    let w = Wait::give_up_after(Duration::ZERO);
    assert_eq!(w.check(), Some(AtDeadline::Aborted));
    assert!(w.aborted());
}

/// The forms logs and messages print: handles in hex, a window with its
/// generation, a wait with its deadline and what fired, an allocator with
/// its backend's name, a comm's owner without its hook.
#[test]
fn handles_waits_and_allocators_print_what_a_log_needs() {
    assert_eq!(format!("{:?}", RawComm(0xab)), "RawComm(0xab)");
    let w = Window {
        raw: 0x20,
        generation: 3,
    };
    assert_eq!(format!("{w:?}"), "Window(0x20#3)");
    let wait = Wait::give_up_after(Duration::from_secs(5));
    let printed = format!("{wait:?}");
    assert!(
        printed.starts_with("Wait { deadline: Some(5s), waited: ")
            && printed.ends_with(", fired: None }"),
        "{printed}"
    );
    let e = wait.timeout("ncclCommWindowRegister", RawComm(0x10));
    assert!(
        e.to_string()
            .starts_with("ncclCommWindowRegister on RawComm(0x10) did not complete in "),
        "{e}"
    );
    let world = SimWorld::new(2);
    assert_eq!(format!("{world:?}"), "SimWorld { nranks: 2, .. }");
    let al = Allocator::new(world.rank(0).unwrap());
    assert_eq!(format!("{al:?}"), "Allocator { backend: \"sim\", .. }");
    let hook: AbortHook = Arc::new(|_| Ok(()));
    let owners = [
        CommOwner::Borrowed,
        CommOwner::BorrowedNonBlocking(hook),
        CommOwner::Owned,
    ];
    let printed: Vec<String> = owners.iter().map(|o| format!("{o:?}")).collect();
    assert_eq!(printed, ["Borrowed", "BorrowedNonBlocking(hook)", "Owned"]);
}

/// A simulated rank knows its number and prints it, and refuses to set up
/// an agreement on a comm it does not know.
#[test]
fn a_simulated_rank_names_itself_and_refuses_unknown_comms() {
    let world = SimWorld::new(2);
    let (r0, r1) = (world.rank(0).unwrap(), world.rank(1).unwrap());
    assert_eq!((r0.rank_id(), r1.rank_id()), (0, 1));
    assert_eq!(format!("{r1:?}"), "SimBackend { rank: 1, .. }");
    assert!(matches!(
        r0.all_reduce_setup(RawComm(0xdead_0000)),
        Err(BackendError::SimRejected {
            call: "ncclAllReduce",
            ..
        })
    ));
}
