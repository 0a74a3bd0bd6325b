//! Benchmarks of the segment registry beside the designs it replaces
//! (issue 7).
//!
//! Every implementation under test is wrapped in one small trait,
//! [`maps::SegmentMap`] (track, untrack, containing-address lookup,
//! enumeration in address and seq order, a registration pass for a comm,
//! the window lookup of issue 9),
//! so that the criterion benches (`benches/st.rs`), the multi-thread
//! throughput binary (`benches/mt.rs`) and the memory binary
//! (`benches/memory.rs`) run the same code on each of them in one run:
//!
//! | name | what it is |
//! | --- | --- |
//! | `registry` | [`segment_registry::Registry`], the crate under test |
//! | `sglang-vec` | SGLang's design: `Mutex<Vec<(ptr, len)>>`, an index watermark per comm, linear search on free, every watermark reset on free |
//! | `mutex-btreemap` | `Mutex<BTreeMap>` keyed by address (each entry with the windows its passes recorded) plus a seq-ordered map for passes |
//! | `scc-treeindex` | two `scc::TreeIndex`es (by address, by seq) with the same seq-watermark logic |
//! | `raw-skipmap` | a bare `crossbeam_skiplist::SkipMap` doing only the key operations (no log, no windows, no passes) |
//!
//! [`results`] holds the JSON schema that the binaries write and the
//! `bench-report` command reads. Under the `loom` feature only [`results`]
//! is built: the registry then runs on loom's atomics, which work only inside
//! a loom model.

pub mod results;

#[cfg(not(feature = "loom"))]
pub mod maps;
#[cfg(not(feature = "loom"))]
pub mod workload;
