//! Proptest strategies for the state machine's operations, drawn from the
//! model's current state so that most operations hit something that exists
//! (a tracked segment's start, edge or inside; an attached comm) and the
//! rest probe errors (unknown addresses, zero and overflowing lengths,
//! overlaps, comms never attached or forgotten).

use proptest::prelude::*;
use proptest::strategy::{BoxedStrategy, Union};

use segment_registry::{CommId, Segment};

use crate::model::Model;
use crate::ops::{Nested, Op, PassScript, Peers, GRANULE};

/// Slots of generated segments: addresses `slot * GRANULE`.
pub const SLOTS: usize = 12;

/// Lengths and starts for `track`: mostly aligned slots of one to three
/// granules (so that overlaps are common), some misaligned, zero-length,
/// overflowing, and arbitrary.
pub fn track_args() -> BoxedStrategy<(usize, usize)> {
    prop_oneof![
        10 => (0..SLOTS, 1..=3usize).prop_map(|(s, l)| (s * GRANULE, l * GRANULE)),
        2 => (0..SLOTS, 1..GRANULE).prop_map(|(s, l)| (s * GRANULE + GRANULE / 2, l)),
        1 => (0..SLOTS).prop_map(|s| (s * GRANULE, 0)),
        1 => (1..4usize, 1..=4usize)
            .prop_map(|(k, l)| (usize::MAX - k * GRANULE + 1, l * GRANULE)),
        1 => (any::<usize>(), any::<usize>()),
    ]
    .boxed()
}

/// Addresses worth probing around the live segments, plus random ones.
fn probe(live: &[Segment]) -> BoxedStrategy<usize> {
    let random = prop_oneof![
        (0..SLOTS + 3, 0..4usize).prop_map(|(s, q)| s * GRANULE + q * (GRANULE / 4)),
        any::<usize>(),
        Just(usize::MAX),
        Just(0usize),
    ];
    if live.is_empty() {
        return random.boxed();
    }
    let live = live.to_vec();
    let near = (proptest::sample::select(live), 0..6usize).prop_map(|(s, w)| match w {
        0 => s.addr,
        1 => s.addr + s.len / 2,
        2 => s.end() - 1,
        3 => s.end(),
        4 => s.addr.wrapping_sub(1),
        _ => s.addr + 1,
    });
    prop_oneof![3 => near, 1 => random].boxed()
}

/// A start address for `untrack`: mostly a live segment's start.
fn untrack_addr(live: &[Segment]) -> BoxedStrategy<usize> {
    if live.is_empty() {
        return probe(live);
    }
    let starts: Vec<usize> = live.iter().map(|s| s.addr).collect();
    prop_oneof![4 => proptest::sample::select(starts), 1 => probe(live)].boxed()
}

/// A comm id: one attached or forgotten, or one never attached.
fn comm(m: &Model) -> BoxedStrategy<CommId> {
    let ids: Vec<CommId> = (0..=m.last_comm + 1).map(CommId).collect();
    let attached = m.attached();
    if attached.is_empty() {
        return proptest::sample::select(ids).boxed();
    }
    prop_oneof![4 => proptest::sample::select(attached), 1 => proptest::sample::select(ids)].boxed()
}

fn nested(m: &Model) -> BoxedStrategy<Nested> {
    let live = m.segments();
    prop_oneof![
        3 => track_args().prop_map(|(addr, len)| Nested::Track { addr, len }),
        5 => (untrack_addr(&live), any::<bool>())
            .prop_map(|(addr, release_now)| Nested::Untrack { addr, release_now }),
        1 => probe(&live).prop_map(|addr| Nested::Find { addr }),
        1 => comm(m).prop_map(|comm| Nested::Pending { comm }),
        2 => Just(Nested::ForgetSelf),
        1 => comm(m).prop_map(|comm| Nested::Forget { comm }),
        2 => comm(m).prop_map(|comm| Nested::Pass { comm }),
    ]
    .boxed()
}

fn script(m: &Model) -> BoxedStrategy<PassScript> {
    let at = || prop::option::weighted(0.3, 0..4usize);
    (
        at(),
        prop::option::weighted(0.1, 0..4usize),
        any::<u8>(),
        prop::collection::vec((0..4usize, nested(m)), 0..4),
        any::<bool>(),
    )
        .prop_map(
            |(fail_at, panic_at, no_window, nested, handbacks_first)| PassScript {
                fail_at,
                panic_at: panic_at.filter(|_| fail_at.is_none()),
                // Most callbacks return a window.
                no_window: no_window & no_window >> 4,
                nested,
                handbacks_first,
            },
        )
        .boxed()
}

/// The next operation, given the model's state. Unless
/// `panic_after_forget`, a script whose callback panics does not forget its
/// own comm (the registry then loses that pass's report).
pub fn op(m: &Model, panic_after_forget: bool) -> BoxedStrategy<Op> {
    let live = m.segments();
    let pass = (comm(m), script(m))
        .prop_map(move |(comm, mut script)| {
            if !panic_after_forget && script.panic_at.is_some() {
                script.nested.retain(|(_, n)| {
                    !matches!(n, Nested::ForgetSelf) && *n != Nested::Forget { comm }
                });
            }
            Op::Pass { comm, script }
        })
        .boxed();
    let arms: Vec<(u32, BoxedStrategy<Op>)> = vec![
        (
            8,
            track_args()
                .prop_map(|(addr, len)| Op::Track { addr, len })
                .boxed(),
        ),
        (
            5,
            untrack_addr(&live)
                .prop_map(|addr| Op::Untrack { addr })
                .boxed(),
        ),
        (3, probe(&live).prop_map(|addr| Op::Find { addr }).boxed()),
        (
            match m.attached().len() {
                0 => 8,
                1 | 2 => 3,
                _ => 1,
            },
            (0..4u64).prop_map(|payload| Op::Attach { payload }).boxed(),
        ),
        (1, comm(m).prop_map(|comm| Op::Forget { comm }).boxed()),
        (1, comm(m).prop_map(|comm| Op::Pending { comm }).boxed()),
        (6, pass),
        (
            3,
            (
                comm(m),
                prop_oneof![
                    4 => Just(Peers::Match),
                    2 => Just(Peers::OneMore),
                    1 => Just(Peers::Ahead),
                    1 => Just(Peers::Abstain),
                    1 => (1..4u32).prop_map(Peers::Fail),
                ],
            )
                .prop_map(|(comm, peers)| Op::Checked { comm, peers })
                .boxed(),
        ),
        (
            2,
            (
                prop::option::weighted(0.3, (0..3usize, 0..3usize)),
                any::<u8>(),
            )
                .prop_map(|(fail, nw)| Op::PassAll {
                    fail,
                    no_window: nw & nw >> 4,
                })
                .boxed(),
        ),
        (
            3,
            (
                comm(m),
                probe(&live),
                prop_oneof![
                    Just(0usize),
                    Just(1),
                    Just(64),
                    Just(GRANULE),
                    Just(2 * GRANULE),
                    Just(usize::MAX)
                ],
            )
                .prop_map(|(comm, ptr, size)| Op::WindowOf { comm, ptr, size })
                .boxed(),
        ),
        (1, Just(Op::Drain).boxed()),
        (1, (60..150usize).prop_map(|n| Op::Churn { n }).boxed()),
    ];
    Union::new_weighted(arms).boxed()
}
