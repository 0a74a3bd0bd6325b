//! The sequential state machine against the shipped registry: random
//! operations (tracks that overlap, have no bytes or overflow; untracks of
//! known, unknown and already untracked addresses; lookups inside, at the
//! edges of and outside segments; attach and forget; passes for one comm
//! and for all, whose callbacks fail, panic, register without a window, or
//! run nested operations; drain; churn that makes the log sweep), each
//! checked against the model, with the full state compared after every
//! step and every window and free accounted for at the end.
//!
//! `PROPTEST_CASES` sets the number of cases (default 10,000).
#![cfg(not(feature = "loom"))]

use proptest::test_runner::{Config, FileFailurePersistence};
use proptest_state_machine::prop_state_machine;
use segment_registry_proptests::env_count;
use segment_registry_proptests::machine::{Correct, RegistryMachine, SmallPages};
use segment_registry_proptests::ops::Op;

fn config() -> Config {
    Config {
        cases: env_count("PROPTEST_CASES", 10_000),
        // Each case runs up to 40 operations; shrinking a failure is quick.
        max_shrink_iters: 20_000,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/state_machine.proptest-regressions",
        ))),
        ..Config::default()
    }
}

prop_state_machine! {
    #![proptest_config(config())]

    /// Model and registry agree on every step.
    #[test]
    fn registry_matches_model(sequential 1..40 => RegistryMachine<Correct>);

    /// The same with a page granule of one generated slot.
    #[test]
    fn registry_matches_model_with_small_pages(sequential 1..40 => RegistryMachine<SmallPages>);
}

/// Non-vacuity of the generator: over a few thousand generated cases, run
/// on the model alone, every kind of outcome the machine is meant to check
/// comes up.
#[test]
fn generated_cases_reach_every_outcome() {
    use std::cell::Cell;
    use std::collections::BTreeMap;

    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::TestRunner;
    use proptest_state_machine::ReferenceStateMachine;
    use segment_registry::{CommError, TrackError, UntrackError, WindowLookupError};
    use segment_registry_proptests::machine::RefMachine;
    use segment_registry_proptests::model::Model;
    use segment_registry_proptests::ops::{run_model, Outcome, PassEnd, PassOut};

    fn count_pass(p: &PassOut, seen: &mut BTreeMap<&'static str, usize>) {
        fn hit(seen: &mut BTreeMap<&'static str, usize>, k: &'static str) {
            *seen.entry(k).or_default() += 1;
        }
        let mut nested_passes = Vec::new();
        let mut hit = |k| hit(seen, k);
        match p.end {
            PassEnd::Ok => hit("pass ok"),
            PassEnd::Comm(CommError::Busy(_)) => hit("pass busy"),
            PassEnd::Comm(CommError::NotAttached(_)) => hit("pass not attached"),
            PassEnd::Callback(..) => hit("pass callback error"),
            PassEnd::Forgotten(_) => hit("pass forgotten"),
            PassEnd::Panicked => hit("pass panicked"),
            PassEnd::Diverged(d) if d.local.abstain != 0 => hit("checked pass abstained"),
            PassEnd::Diverged(_) => hit("checked pass diverged"),
            PassEnd::Agreement(_) => hit("checked pass agreement failed"),
        }
        if !p.handed_back.is_empty() {
            hit("pass handed back");
        }
        if !p.free_now.is_empty() {
            hit("pass free_now");
        }
        if p.releases.iter().any(|r| r.1) {
            hit("hold released last after pass");
        }
        for (_, o) in &p.nested {
            match o {
                Outcome::Untrack(Ok((u, _))) if u.held => hit("untrack held by pass"),
                Outcome::Track(Ok(_)) => hit("track during pass"),
                Outcome::Forget(Ok(_)) => hit("forget during pass"),
                Outcome::Pass(q) => nested_passes.push(q),
                _ => {}
            }
        }
        for q in nested_passes {
            count_pass(q, seen);
        }
    }

    let mut runner = TestRunner::deterministic();
    let strategy = RefMachine::<Correct>::sequential_strategy(1..40);
    let mut seen: BTreeMap<&'static str, usize> = BTreeMap::new();
    for _ in 0..3_000 {
        let (init, ops, _) = strategy.new_tree(&mut runner).unwrap().current();
        let mut m: Model = init.model;
        let w = Cell::new(0);
        for op in &ops {
            let o = run_model(&mut m, op, &w);
            let mut hit = |k| *seen.entry(k).or_default() += 1;
            match &o {
                Outcome::Track(Ok(_)) => hit("track ok"),
                Outcome::Track(Err(TrackError::ZeroLength { .. })) => hit("track zero length"),
                Outcome::Track(Err(TrackError::Overflow { .. })) => hit("track overflow"),
                Outcome::Track(Err(TrackError::Overlap { .. })) => hit("track overlap"),
                Outcome::Untrack(Ok((u, _))) if !u.windows.is_empty() => hit("untrack windows"),
                Outcome::Untrack(Err(UntrackError::Unknown { .. })) => hit("untrack unknown"),
                Outcome::Find(Some(s)) if op == &Op::Find { addr: s.end() - 1 } => {
                    hit("find last byte")
                }
                Outcome::Find(None) => hit("find none"),
                Outcome::Forget(Ok((ws, _, _))) if !ws.is_empty() => hit("forget windows"),
                Outcome::Forget(Err(_)) => hit("forget refused"),
                Outcome::Pending(Ok(n)) if *n > 0 => hit("pending > 0"),
                Outcome::Pass(p) => count_pass(p, &mut seen),
                Outcome::Checked(Some(_), p) => {
                    if p.end == PassEnd::Ok && !p.registered.is_empty() {
                        hit("checked pass registered");
                    }
                    count_pass(p, &mut seen)
                }
                Outcome::PassAll(ps) if ps.len() > 1 => hit("pass all, several comms"),
                Outcome::Drain(us) if !us.is_empty() => hit("drain"),
                Outcome::WindowOf(Ok(_)) => hit("window_of found"),
                Outcome::WindowOf(Err(e)) => hit(match e {
                    WindowLookupError::NotAttached(_) => "window_of not attached",
                    WindowLookupError::NotTracked { .. } => "window_of not tracked",
                    WindowLookupError::CrossesEnd { .. } => "window_of crosses end",
                    WindowLookupError::NotRegistered { .. } => "window_of not registered",
                    WindowLookupError::NoWindow { .. } => "window_of no window",
                }),
                _ => {}
            }
        }
        if m.log.as_ref().is_some_and(|l| l.sweeps > 0) {
            *seen.entry("sweep").or_default() += 1;
        }
    }
    eprintln!("{seen:#?}");
    let want = [
        "track ok",
        "track zero length",
        "track overflow",
        "track overlap",
        "untrack windows",
        "untrack unknown",
        "find last byte",
        "find none",
        "forget windows",
        "forget refused",
        "pending > 0",
        "pass ok",
        "pass busy",
        "pass not attached",
        "pass callback error",
        "pass forgotten",
        "pass panicked",
        "checked pass registered",
        "checked pass diverged",
        "checked pass abstained",
        "checked pass agreement failed",
        "pass handed back",
        "pass free_now",
        "hold released last after pass",
        "untrack held by pass",
        "track during pass",
        "forget during pass",
        "pass all, several comms",
        "drain",
        "sweep",
        "window_of found",
        "window_of not attached",
        "window_of not tracked",
        "window_of crosses end",
        "window_of not registered",
        "window_of no window",
    ];
    let missing: Vec<_> = want.iter().filter(|k| !seen.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "never generated: {missing:?}\n{seen:#?}"
    );
}
