//! What the `mt` and `memory` bench binaries write (JSON, plus CSV for the
//! throughput) and `bench-report` reads.
//!
//! Both binaries write into one results folder: `$SEGREG_BENCH_OUT` if set,
//! else `$CARGO_TARGET_DIR/segreg-bench`, else `target/segreg-bench`
//! (relative to the working directory, which is where criterion's own
//! fallback `target/criterion` lives too).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// File name of the multi-thread results in the results folder.
pub const MT_JSON: &str = "mt.json";
/// File name of the multi-thread throughput as CSV.
pub const MT_CSV: &str = "mt.csv";
/// File name of the memory results.
pub const MEMORY_JSON: &str = "memory.json";

/// The results folder (see the module docs).
pub fn results_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SEGREG_BENCH_OUT") {
        return PathBuf::from(d);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    target.join("segreg-bench")
}

/// The registry code the benchmarks were built from: the repository's
/// commit (`+dirty` if `registry/` had uncommitted changes), recorded by
/// `build.rs`.
pub const REGISTRY_REV: &str = env!("SEGREG_BENCH_REGISTRY_REV");

/// The machine a result was measured on.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    /// Logical CPUs available to the process.
    pub cores: usize,
    /// CPU model name (from `/proc/cpuinfo`).
    pub cpu: String,
    /// Operating system.
    pub os: String,
    /// UTC date of the run, `YYYY-MM-DD`.
    pub date: String,
    /// [`REGISTRY_REV`] of the binary that measured.
    #[serde(default)]
    pub registry_rev: String,
}

/// One multi-thread throughput measurement.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Throughput {
    /// Implementation name (see `maps::NAMES`).
    pub implementation: String,
    /// Live segments.
    pub n: usize,
    /// `read-mostly` (75 % lookups) or `churn-heavy` (50 %).
    pub mix: String,
    /// Worker threads.
    pub threads: usize,
    /// Wall time measured, seconds.
    pub secs: f64,
    /// Operations completed (a lookup is one; an untrack+track pair is one).
    pub ops: u64,
    /// `ops / secs`.
    pub ops_per_sec: f64,
}

/// Latency of a registration pass with nothing pending.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PassLatency {
    /// Implementation name.
    pub implementation: String,
    /// Live segments.
    pub n: usize,
    /// Median over batches of the mean ns per pass, no other thread
    /// running, after the map's deferred frees were flushed.
    pub idle_ns: f64,
    /// The same while `lookup_threads` threads do lookups.
    pub loaded_ns: f64,
    /// Mean over all batches, idle (counts every stall the median hides).
    #[serde(default)]
    pub idle_mean_ns: f64,
    /// Mean over all batches, loaded.
    #[serde(default)]
    pub loaded_mean_ns: f64,
    /// Median, idle, measured right after the throughput runs, before the
    /// map's deferred frees were flushed (epoch-based maps make the next
    /// pinning thread run them).
    #[serde(default)]
    pub after_churn_ns: f64,
    /// Threads doing lookups during `loaded_ns`.
    pub lookup_threads: usize,
}

/// Window-lookup latency (issue 9): T threads doing nothing but
/// `window_of` lookups on one map whose segments one comm registered.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WindowLookup {
    /// Implementation name.
    pub implementation: String,
    /// Live segments (all registered).
    pub n: usize,
    /// Threads doing lookups.
    pub threads: usize,
    /// Wall time measured, seconds.
    pub secs: f64,
    /// Lookups completed, all threads together.
    pub lookups: u64,
    /// Mean ns per lookup per thread: `threads * secs / lookups`, in ns
    /// (the latency one thread sees; with more threads than cores it
    /// includes the time the thread waited for a core).
    pub ns_per_lookup: f64,
    /// `lookups / secs`, all threads together.
    pub lookups_per_sec: f64,
}

/// Everything `mt` writes.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MtResults {
    /// Where it ran.
    pub machine: Machine,
    /// Seconds per throughput point.
    pub secs_per_point: f64,
    /// Whether this was a `--test` smoke run (figures meaningless).
    pub smoke: bool,
    /// Throughput points.
    pub throughput: Vec<Throughput>,
    /// Pass latencies.
    pub pass_latency: Vec<PassLatency>,
    /// Window-lookup latencies (absent from files written before issue 9).
    #[serde(default)]
    pub window_lookup: Vec<WindowLookup>,
    /// Seconds per window-lookup point (0 in older files).
    #[serde(default)]
    pub window_secs_per_point: f64,
}

/// One memory measurement.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MemoryRow {
    /// Implementation name.
    pub implementation: String,
    /// Live segments.
    pub n: usize,
    /// `tracked` (just built), `after churn` (after 2n random untrack+track,
    /// reclamation flushed), or `1 comm registered` (a pass has recorded one
    /// window per segment).
    pub phase: String,
    /// Heap bytes held (requested sizes, not counting allocator overhead).
    pub bytes: u64,
    /// `bytes / n`.
    pub bytes_per_segment: f64,
}

/// Everything `memory` writes.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MemoryResults {
    /// Where it ran.
    pub machine: Machine,
    /// Whether this was a `--test` smoke run.
    pub smoke: bool,
    /// Rows.
    pub rows: Vec<MemoryRow>,
}

/// Today's UTC date as `YYYY-MM-DD`.
pub fn utc_date_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::{civil_from_days, MtResults};

    #[test]
    fn mt_json_without_window_lookups_still_parses() {
        let old = r#"{"machine": {"cores": 2, "cpu": "x", "os": "linux", "date": "2026-01-01"},
                      "secs_per_point": 1.0, "smoke": false,
                      "throughput": [], "pass_latency": []}"#;
        let mt: MtResults = serde_json::from_str(old).unwrap();
        assert!(mt.window_lookup.is_empty());
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }
}
