//! The sequential state machine: [`RefMachine`] drives the model and draws
//! operations from its state; [`RegistryMachine`] runs the same operations
//! on a real registry (with the faults a [`Variant`] picks) and checks,
//! after every step, that the results and the whole observable state
//! agree.

use std::cell::Cell;
use std::marker::PhantomData;

use proptest::prelude::*;
use proptest::strategy::BoxedStrategy;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};
use segment_registry::Faults;

use crate::model::{Model, Window};
use crate::ops::{run_model, Op, Outcome, Snapshot, Sut};

/// The reference state: the model, the window counter, and what the last
/// operation should have returned.
#[derive(Clone, Debug)]
pub struct RefState {
    /// The model.
    pub model: Model,
    /// The last window number handed out.
    pub next_window: Window,
    /// The expected outcome of the last operation.
    pub last: Option<Outcome>,
}

/// Which registry the machine runs against, and which operations it draws.
pub trait Variant: 'static {
    /// The faults switched on.
    const FAULTS: Faults;
    /// Whether a pass whose callback panics may also forget its own comm
    /// from inside a callback. Off for the shipped registry: the report of
    /// such a pass (its hand-backs and `free_now`) is parked on a comm
    /// nobody can reach any more, so a window or a free goes missing (see
    /// `tests/bad_input.rs`, `panic_after_forget_in_callback_loses_no_window`).
    const PANIC_AFTER_FORGET: bool = false;
    /// The registry's page-map granule. The default (2 MiB) puts every
    /// generated segment in one shared granule, so lookups take the
    /// skiplist; [`SmallPages`] gives each generated slot its own.
    const PAGE_GRANULE: usize = segment_registry::DEFAULT_PAGE_GRANULE;
}

/// The shipped registry.
#[derive(Debug)]
pub struct Correct;

impl Variant for Correct {
    const FAULTS: Faults = Faults::NONE;
}

/// The shipped registry with a page granule of one generated slot
/// ([`GRANULE`](crate::ops::GRANULE)): lookups of aligned segments take the
/// page map's one-segment path, and segments that share a slot (unaligned
/// ones) its counted path.
#[derive(Debug)]
pub struct SmallPages;

impl Variant for SmallPages {
    const FAULTS: Faults = Faults::NONE;
    const PAGE_GRANULE: usize = crate::ops::GRANULE;
}

/// The reference machine (generic only to pick what it draws).
#[derive(Debug)]
pub struct RefMachine<V>(PhantomData<V>);

impl<V: Variant> ReferenceStateMachine for RefMachine<V> {
    type State = RefState;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<RefState> {
        Just(RefState {
            model: Model::new(true),
            next_window: 0,
            last: None,
        })
        .boxed()
    }

    fn transitions(state: &RefState) -> BoxedStrategy<Op> {
        crate::strategies::op(&state.model, V::PANIC_AFTER_FORGET)
    }

    fn apply(mut state: RefState, op: &Op) -> RefState {
        let w = Cell::new(state.next_window);
        state.last = Some(run_model(&mut state.model, op, &w));
        state.next_window = w.get();
        state
    }
}

/// The machine that runs the real registry.
#[derive(Debug)]
pub struct RegistryMachine<V>(PhantomData<V>);

impl<V: Variant> StateMachineTest for RegistryMachine<V> {
    type SystemUnderTest = Sut;
    type Reference = RefMachine<V>;

    fn init_test(_: &RefState) -> Sut {
        Sut::with_page_granule(V::FAULTS, V::PAGE_GRANULE)
    }

    fn apply(sut: Sut, ref_state: &RefState, op: Op) -> Sut {
        let got = sut.run(&op);
        let want = ref_state.last.as_ref().expect("the reference ran the op");
        assert_eq!(&got, want, "outcome of {op:?}");
        sut
    }

    fn check_invariants(sut: &Sut, ref_state: &RefState) {
        check_snapshot(sut, &ref_state.model);
    }

    fn teardown(sut: Sut) {
        sut.settle();
    }
}

/// Compares the registry's full observable state with the model's.
pub fn check_snapshot(sut: &Sut, model: &Model) {
    let got = Snapshot::of(&sut.reg);
    let want = Snapshot::expected(model, got.stats.nodes);
    assert_eq!(got, want, "registry state");
    let n = got.stats.nodes;
    assert!(n.freed <= n.retired, "freed more nodes than retired: {n:?}");
}

/// Negative control: `seq` taken from a counter when `track` starts (a
/// rejected track burns one), and passes skip seqs at or below the highest
/// they have seen.
#[derive(Debug)]
pub struct NaiveCursor;

impl Variant for NaiveCursor {
    const FAULTS: Faults = Faults {
        naive_cursor: true,
        ..Faults::NONE
    };
}

/// Negative control: a pass records its window on a segment that was
/// untracked while the callback ran, where nobody will ever claim it.
#[derive(Debug)]
pub struct UncheckedWindowAdd;

impl Variant for UncheckedWindowAdd {
    const FAULTS: Faults = Faults {
        unchecked_window_add: true,
        ..Faults::NONE
    };
}

/// The shipped registry, with callbacks that panic after forgetting their
/// own comm (the registry loses that pass's report).
#[derive(Debug)]
pub struct PanicAfterForget;

impl Variant for PanicAfterForget {
    const FAULTS: Faults = Faults::NONE;
    const PANIC_AFTER_FORGET: bool = true;
}

/// How a machine run against a variant ended.
#[derive(Debug)]
pub enum Verdict {
    /// Every case passed.
    Passed {
        /// Cases run.
        cases: u32,
    },
    /// A case failed; this is the shrunk one.
    Failed {
        /// The failure message.
        reason: String,
        /// The shrunk sequence of operations.
        ops: Vec<Op>,
    },
}

/// Runs the machine against variant `V` for up to `cases` cases (without
/// failure persistence) and returns the verdict with the shrunk case.
pub fn run_variant<V: Variant>(cases: u32, seed: [u8; 32]) -> Verdict {
    use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 50_000,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(
        config.clone(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed),
    );
    let strategy = RefMachine::<V>::sequential_strategy(1..40);
    let result = runner.run(&strategy, |(init, ops, seen)| {
        RegistryMachine::<V>::test_sequential(config.clone(), init, ops, seen);
        Ok(())
    });
    match result {
        Ok(()) => Verdict::Passed { cases },
        Err(TestError::Fail(reason, (_, ops, _))) => Verdict::Failed {
            reason: reason.message().to_string(),
            ops,
        },
        Err(TestError::Abort(reason)) => panic!("aborted: {reason}"),
    }
}
