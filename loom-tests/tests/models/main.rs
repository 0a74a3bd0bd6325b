//! The loom models of the registry protocol (DESIGN.md §11, §12), one
//! module per guarantee, one `#[test]` per model, and the negative
//! controls: the same model code run on a registry built with a
//! deliberately broken variant (`Faults`, chosen at run time), each
//! expected to fail with the text of the property's own assertion.
//! Controls are named `negative_…`; each model prints its figures under
//! its test's name (`loom model fixed_set::tracks_race_a_pass: explored …`).
//!
//! * `fixed_set`: what a pass registers against racing tracks (Fixed set,
//!   Order, No duplicates);
//! * `linearizability`: lookups and iteration against an untrack, and what
//!   a pass is linearizable with (and what not);
//! * `no_duplicates`: two passes for one comm (No duplicates, `Busy`);
//! * `exactly_once_windows`: untracks and forget racing a pass;
//! * `failure_atomicity`: a callback failure racing a track;
//! * `overlap`: overlapping tracks, and a track racing the untrack of the
//!   segment it overlaps;
//! * `window_lookup`: `window_of` racing forget, untrack and a pass;
//! * `page_map`: lookups through the page map racing address reuse, exact
//!   counts, and slots that never name a freed node;
//! * `reclamation`: sweeps racing readers, appends, each other and passes;
//! * `agreement`: a checked pass's digest against racing untracks and tracks;
//! * `common`: the set-up, the [`Ledger`](common::Ledger) and the
//!   operations as a well-behaved caller runs them.
//!
//! Every model runs the shipped protocol code on the loom model index
//! (`segment_registry_loom::ModelIndex`). Windows are `(comm, segment)`
//! pairs, so each one names itself; a `Ledger` follows every window from
//! the callback that made it to the party that hands it back, and every
//! untracked segment's memory to the party that frees it.
//!
//! Two kinds of observation are used, on purpose:
//! * "happened before" is what loom's memory model allows a caller to rely
//!   on: it is established by the models' own loom Release/Acquire flags
//!   (e.g. "this track returned before the pass began");
//! * the `Ledger`'s `std` bookkeeping sees the order in which loom ran the
//!   steps. It is used only where the protocol decides by read-modify-write
//!   operations on one word (holds, claims), which loom performs in that
//!   order.
#![cfg(feature = "loom")]

mod common;

mod agreement;
mod exactly_once_windows;
mod failure_atomicity;
mod fixed_set;
mod linearizability;
mod no_duplicates;
mod overlap;
mod page_map;
mod reclamation;
mod window_lookup;
