//! `SEGREG_DEADLINE_MS`: the deadline every attach gets unless it sets its
//! own. One test function, since it sets the process's environment.
#![cfg(not(feature = "loom"))]

use std::time::Duration;

use segment_registry_nccl::{deadline_from_env, DEADLINE_ENV, DEFAULT_DEADLINE};

/// A positive integer (spaces around it allowed) is the deadline in
/// milliseconds; anything else, and no variable, is the default.
#[test]
fn the_environment_sets_the_deadline_only_with_positive_milliseconds() {
    let with = |v: Option<&str>| {
        match v {
            Some(v) => std::env::set_var(DEADLINE_ENV, v),
            None => std::env::remove_var(DEADLINE_ENV),
        }
        deadline_from_env()
    };
    assert_eq!(with(Some("250")), Duration::from_millis(250));
    assert_eq!(with(Some(" 42\n")), Duration::from_millis(42));
    assert_eq!(with(Some("1")), Duration::from_millis(1));
    for bad in ["0", "-5", "1.5", "ten", ""] {
        assert_eq!(with(Some(bad)), DEFAULT_DEADLINE, "{bad:?}");
    }
    assert_eq!(with(None), DEFAULT_DEADLINE);
    assert_eq!(DEFAULT_DEADLINE, Duration::from_secs(600));
}
