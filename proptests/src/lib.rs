//! Property, state-machine and linearizability tests of the segment
//! registry (issue 5).
//!
//! * [`model`]: the sequential specification, written with plain maps.
//! * [`ops`]: the operations of the state machine, run on the model and on
//!   the real registry, with results in comparable form; [`ops::Ledger`]
//!   checks exactly-once windows and frees independently of the model.
//! * [`strategies`]: how operations are drawn from the model's state.
//! * [`machine`]: the `proptest-state-machine` machines, and the broken
//!   variants the negative controls run.
//! * [`lin`]: concurrent histories and a Wing–Gong linearizability
//!   checker (with memoization) against [`model::Model`].
//! * [`concurrent`]: running operations from several threads and recording
//!   them as histories.
//! * [`pausing`]: an address index that parks a chosen `track` inside the
//!   registry, to script races deterministically.
//!
//! The tests are in `tests/`; `README.md` says what each one checks and how
//! to raise its case counts.
//!
//! ```
//! # #[cfg(not(feature = "loom"))] {
//! use std::cell::Cell;
//! use segment_registry::Faults;
//! use segment_registry_proptests::{model::Model, ops::{run_model, Op, Sut}};
//!
//! let op = Op::Track { addr: 0x1000, len: 0x1000 };
//! let sut = Sut::new(Faults::NONE);
//! let mut model = Model::new(true);
//! assert_eq!(sut.run(&op), run_model(&mut model, &op, &Cell::new(0)));
//! # }
//! ```

pub mod concurrent;
pub mod lin;
pub mod machine;
pub mod model;
pub mod ops;
pub mod pausing;
pub mod strategies;

/// Reads a case count from the environment variable `var`, else `default`.
pub fn env_count(var: &str, default: u32) -> u32 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
