//! `bench-report`: turns criterion's JSON estimates and the `mt` / `memory`
//! binaries' JSON into a markdown section of ratios, with the issue's
//! targets marked met or missed, and an SVG plot of throughput against
//! threads (no external tools).
//!
//! ```text
//! bench-report --machine "LABEL" [--criterion DIR] [--results DIR]
//!              [--note TEXT] [--out RESULTS.md] [--svg FILE]
//! ```
//!
//! * `--criterion DIR`: criterion's output folder (default `$CRITERION_HOME`,
//!   else `$CARGO_TARGET_DIR/criterion`, else `target/criterion`).
//! * `--results DIR`: where `mt.json` and `memory.json` are (default: the
//!   folder the binaries write to, see `segment_registry_benches::results`).
//! * `--out FILE`: the markdown file to update. The section for `LABEL` is
//!   replaced if present, else appended. Without `--out` the section goes to
//!   standard output.
//! * `--svg FILE`: where the plot goes (default: beside `--out`, named after
//!   the label; without `--out`, in the results folder).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use segment_registry_benches::results::{self, MemoryResults, MtResults};

/// The implementations, in column order (the same as `maps::NAMES`, which
/// is not built under the `loom` feature).
const IMPLS: [&str; 5] = [
    "registry",
    "sglang-vec",
    "mutex-btreemap",
    "scc-treeindex",
    "raw-skipmap",
];
const REG: &str = "registry";

/// Criterion groups, in row order.
const GROUPS: [&str; 9] = [
    "track",
    "untrack",
    "round_trip",
    "lookup",
    "by_address",
    "by_seq",
    "pass_none",
    "pass_k25",
    "pass_k1000",
];

#[derive(Default)]
struct Args {
    machine: String,
    criterion: Option<PathBuf>,
    results: Option<PathBuf>,
    note: Option<String>,
    out: Option<PathBuf>,
    svg: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        machine: "unnamed machine".into(),
        ..Args::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--machine" => a.machine = val()?,
            "--criterion" => a.criterion = Some(val()?.into()),
            "--results" => a.results = Some(val()?.into()),
            "--note" => a.note = Some(val()?),
            "--out" => a.out = Some(val()?.into()),
            "--svg" => a.svg = Some(val()?.into()),
            "-h" | "--help" => {
                return Err("usage: bench-report --machine LABEL [--criterion DIR] \
                            [--results DIR] [--note TEXT] [--out RESULTS.md] [--svg FILE]"
                    .into())
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(a)
}

fn default_criterion_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CRITERION_HOME") {
        return d.into();
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("criterion")
}

// --------------------------------------------------------------------------
// Criterion estimates
// --------------------------------------------------------------------------

/// (group, implementation, n) -> ns per iteration.
type Estimates = BTreeMap<(String, String, usize), f64>;

#[derive(serde::Deserialize)]
struct BenchmarkJson {
    group_id: String,
    function_id: Option<String>,
    value_str: Option<String>,
}

#[derive(serde::Deserialize)]
struct Estimate {
    point_estimate: f64,
}

#[derive(serde::Deserialize)]
struct EstimatesJson {
    mean: Estimate,
    slope: Option<Estimate>,
}

/// Reads every `*/new/benchmark.json` + `estimates.json` under `dir`. The
/// figure is criterion's headline one: the slope where it has one (linear
/// sampling), else the mean.
fn read_criterion(dir: &Path) -> Estimates {
    let mut out = Estimates::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if !p.is_dir() {
                continue;
            }
            if p.file_name().is_some_and(|n| n == "new") {
                if let Some(row) = read_one(&p) {
                    out.insert((row.0, row.1, row.2), row.3);
                }
            } else {
                stack.push(p);
            }
        }
    }
    out
}

fn read_one(new: &Path) -> Option<(String, String, usize, f64)> {
    let b: BenchmarkJson =
        serde_json::from_str(&std::fs::read_to_string(new.join("benchmark.json")).ok()?).ok()?;
    let e: EstimatesJson =
        serde_json::from_str(&std::fs::read_to_string(new.join("estimates.json")).ok()?).ok()?;
    let n = b.value_str?.parse().ok()?;
    let ns = e.slope.map_or(e.mean.point_estimate, |s| s.point_estimate);
    Some((b.group_id, b.function_id?, n, ns))
}

fn est(e: &Estimates, group: &str, imp: &str, n: usize) -> Option<f64> {
    e.get(&(group.to_string(), imp.to_string(), n)).copied()
}

// --------------------------------------------------------------------------
// Formatting
// --------------------------------------------------------------------------

fn fmt_ns(ns: f64) -> String {
    let (v, unit) = if ns < 1e3 {
        (ns, "ns")
    } else if ns < 1e6 {
        (ns / 1e3, "µs")
    } else if ns < 1e9 {
        (ns / 1e6, "ms")
    } else {
        (ns / 1e9, "s")
    };
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$} {unit}")
}

fn fmt_ratio(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}×")
    } else if r >= 10.0 {
        format!("{r:.1}×")
    } else {
        format!("{r:.2}×")
    }
}

fn fmt_n(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_ops(ops: f64) -> String {
    if ops >= 1e6 {
        format!("{:.2} M", ops / 1e6)
    } else if ops >= 1e3 {
        format!("{:.1} k", ops / 1e3)
    } else {
        format!("{ops:.0}")
    }
}

fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

// --------------------------------------------------------------------------
// Targets
// --------------------------------------------------------------------------

struct Target {
    what: String,
    measured: String,
    /// `Some(true)` met, `Some(false)` missed, `None` not measured.
    verdict: Option<bool>,
}

fn verdict(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "**met**",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

/// All of `checks` met, if any was measured.
fn all(checks: &[Option<bool>]) -> Option<bool> {
    let measured: Vec<bool> = checks.iter().flatten().copied().collect();
    if measured.is_empty() || measured.len() < checks.len() {
        return if measured.contains(&false) {
            Some(false)
        } else {
            None
        };
    }
    Some(measured.iter().all(|&b| b))
}

fn targets(
    e: &Estimates,
    mt: Option<&MtResults>,
    mem: Option<&MemoryResults>,
    sizes: &[usize],
) -> Vec<Target> {
    let mut t = Vec::new();

    // 1. untrack at n = 100k >= 100x faster than Mutex<Vec>.
    {
        let r = est(e, "untrack", "sglang-vec", 100_000)
            .zip(est(e, "untrack", REG, 100_000))
            .map(|(v, r)| v / r);
        t.push(Target {
            what: "untrack at n = 100,000 ≥ 100× faster than Mutex<Vec> (SGLang)".into(),
            measured: r.map_or("–".into(), |r| format!("{} faster", fmt_ratio(r))),
            verdict: r.map(|r| r >= 100.0),
        });
    }

    // 2. track and untrack within 1.3x of raw SkipMap (BTreeMap beside).
    for (group, op) in [("track", "insert"), ("untrack", "remove")] {
        let mut parts = Vec::new();
        let mut checks = Vec::new();
        for &n in sizes {
            let reg = est(e, group, REG, n);
            let sk = est(e, group, "raw-skipmap", n);
            let bt = est(e, group, "mutex-btreemap", n);
            if let (Some(r), Some(s)) = (reg, sk) {
                let ratio = r / s;
                checks.push(Some(ratio <= 1.3));
                let beside = bt.map_or(String::new(), |b| {
                    format!(", Mutex<BTreeMap> {}", fmt_ratio(b / s))
                });
                parts.push(format!("n={}: {}{beside}", fmt_n(n), fmt_ratio(ratio)));
            } else {
                checks.push(None);
            }
        }
        t.push(Target {
            what: format!(
                "single-thread {group} within 1.3× of raw SkipMap {op} (time ÷ SkipMap's)"
            ),
            measured: if parts.is_empty() {
                "–".into()
            } else {
                parts.join("; ")
            },
            verdict: all(&checks),
        });
    }

    // 3. lookup >= 5x faster than Mutex<BTreeMap>.
    {
        let mut parts = Vec::new();
        let mut checks = Vec::new();
        for &n in sizes {
            match est(e, "lookup", "mutex-btreemap", n).zip(est(e, "lookup", REG, n)) {
                Some((b, r)) => {
                    checks.push(Some(b / r >= 5.0));
                    parts.push(format!("n={}: {}", fmt_n(n), fmt_ratio(b / r)));
                }
                None => checks.push(None),
            }
        }
        t.push(Target {
            what: "single-thread lookup ≥ 5× faster than Mutex<BTreeMap>".into(),
            measured: if parts.is_empty() {
                "–".into()
            } else {
                parts.join("; ")
            },
            verdict: all(&checks),
        });
    }

    // 4. lookup at 100k <= 3x lookup at 1k.
    {
        let r = est(e, "lookup", REG, 100_000)
            .zip(est(e, "lookup", REG, 1_000))
            .map(|(a, b)| (a, b, a / b));
        t.push(Target {
            what: "lookup at n = 100,000 ≤ 3× its time at n = 1,000".into(),
            measured: r.map_or("–".into(), |(a, b, r)| {
                format!("{} vs {} = {}", fmt_ns(a), fmt_ns(b), fmt_ratio(r))
            }),
            verdict: r.map(|(_, _, r)| r <= 3.0),
        });
    }

    // 5. 16 threads read-mostly: >= raw SkipMap and ahead of scc at every n.
    {
        let mut parts = Vec::new();
        let mut checks = Vec::new();
        if let Some(mt) = mt {
            let at16 = |imp: &str, n: usize| {
                mt.throughput
                    .iter()
                    .find(|r| {
                        r.implementation == imp
                            && r.n == n
                            && r.mix == "read-mostly"
                            && r.threads == 16
                    })
                    .map(|r| r.ops_per_sec)
            };
            let mut ns: Vec<usize> = mt.throughput.iter().map(|r| r.n).collect();
            ns.sort_unstable();
            ns.dedup();
            for n in ns {
                let reg = at16(REG, n);
                let sk = at16("raw-skipmap", n);
                let scc = at16("scc-treeindex", n);
                if let (Some(r), Some(s), Some(c)) = (reg, sk, scc) {
                    checks.push(Some(r >= s && r > c));
                    parts.push(format!(
                        "n={}: {} vs SkipMap {}, vs scc {}",
                        fmt_n(n),
                        fmt_ratio(r / s),
                        if r >= s { "≥" } else { "<" },
                        fmt_ratio(r / c)
                    ));
                } else {
                    checks.push(None);
                }
            }
        }
        t.push(Target {
            what: "16 threads, read-mostly: throughput ≥ raw SkipMap and > scc::TreeIndex at every n (registry ÷ baseline)".into(),
            measured: if parts.is_empty() {
                "– (no 16-thread points)".into()
            } else {
                parts.join("; ")
            },
            verdict: all(&checks),
        });
    }

    // 6. nothing-pending pass < 50 ns, and <= 2x slower under 15 lookup threads.
    {
        let mut parts = Vec::new();
        let mut checks = Vec::new();
        for &n in sizes {
            if let Some(ns) = est(e, "pass_none", REG, n) {
                checks.push(Some(ns < 50.0));
                parts.push(format!("n={}: {}", fmt_n(n), fmt_ns(ns)));
            } else {
                checks.push(None);
            }
        }
        t.push(Target {
            what: "nothing-pending pass < 50 ns (criterion, single thread)".into(),
            measured: if parts.is_empty() {
                "–".into()
            } else {
                parts.join("; ")
            },
            verdict: all(&checks),
        });
        let mut parts = Vec::new();
        let mut checks = Vec::new();
        if let Some(mt) = mt {
            for p in mt.pass_latency.iter().filter(|p| p.implementation == REG) {
                let r = p.loaded_ns / p.idle_ns;
                checks.push(Some(r <= 2.0));
                parts.push(format!(
                    "n={}: {} idle, {} with {} lookup threads ({})",
                    fmt_n(p.n),
                    fmt_ns(p.idle_ns),
                    fmt_ns(p.loaded_ns),
                    p.lookup_threads,
                    fmt_ratio(r)
                ));
            }
        }
        t.push(Target {
            what: "nothing-pending pass not slowed > 2× by 15 lookup threads".into(),
            measured: if parts.is_empty() {
                "–".into()
            } else {
                parts.join("; ")
            },
            verdict: if checks.is_empty() {
                None
            } else {
                all(&checks)
            },
        });
    }

    // 7. <= 256 bytes per live segment.
    {
        let mut parts = Vec::new();
        let mut checks = Vec::new();
        if let Some(mem) = mem {
            for r in mem.rows.iter().filter(|r| r.implementation == REG) {
                checks.push(Some(r.bytes_per_segment <= 256.0));
                parts.push(format!(
                    "n={} {}: {:.0} B",
                    fmt_n(r.n),
                    r.phase,
                    r.bytes_per_segment
                ));
            }
        }
        t.push(Target {
            what: "≤ 256 bytes per live segment (heap, every phase)".into(),
            measured: if parts.is_empty() {
                "–".into()
            } else {
                parts.join("; ")
            },
            verdict: if checks.is_empty() {
                None
            } else {
                all(&checks)
            },
        });
    }
    t
}

// --------------------------------------------------------------------------
// Markdown
// --------------------------------------------------------------------------

fn section(
    a: &Args,
    e: &Estimates,
    mt: Option<&MtResults>,
    mem: Option<&MemoryResults>,
    svg_name: Option<&str>,
) -> String {
    let mut s = String::new();
    let mut sizes: Vec<usize> = e.keys().map(|k| k.2).collect();
    sizes.sort_unstable();
    sizes.dedup();

    let machine = mt
        .map(|m| &m.machine)
        .or(mem.map(|m| &m.machine))
        .cloned()
        .unwrap_or_default();
    writeln!(s, "## {}\n", a.machine).unwrap();
    if !machine.registry_rev.is_empty() {
        writeln!(
            s,
            "Registry code: commit `{}` (bench-report built from `{}`).",
            machine.registry_rev,
            results::REGISTRY_REV
        )
        .unwrap();
    }
    writeln!(
        s,
        "Measured {} on {} ({} logical CPUs, {}).",
        if machine.date.is_empty() {
            results::utc_date_now()
        } else {
            machine.date.clone()
        },
        if machine.cpu.is_empty() {
            "an unrecorded CPU"
        } else {
            &machine.cpu
        },
        machine.cores,
        machine.os
    )
    .unwrap();
    if let Some(note) = &a.note {
        writeln!(s, "Settings: {note}.").unwrap();
    }
    if let Some(mt) = mt {
        writeln!(
            s,
            "Multi-thread: {} s per {} point{}.",
            mt.secs_per_point,
            if mt.throughput.is_empty() {
                "window-lookup"
            } else {
                "throughput"
            },
            if mt.smoke {
                " (**smoke run: figures meaningless**)"
            } else {
                ""
            }
        )
        .unwrap();
    }
    s.push('\n');

    // Targets.
    writeln!(s, "### Targets (issue 7)\n").unwrap();
    writeln!(s, "| target | measured | verdict |\n| --- | --- | --- |").unwrap();
    for t in targets(e, mt, mem, &sizes) {
        writeln!(
            s,
            "| {} | {} | {} |",
            t.what,
            t.measured,
            verdict(t.verdict)
        )
        .unwrap();
    }
    s.push('\n');

    // Single thread.
    // The window lookup has its own table below.
    if e.keys().any(|k| GROUPS.contains(&k.0.as_str())) {
        writeln!(
            s,
            "### Single thread (criterion: time per operation)\n\n\
             In brackets: the registry's speed-up, baseline time ÷ registry time \
             (above 1: the registry is faster). `track` / `untrack`: one call with \
             n live segments; `round_trip`: untrack + track of a random live \
             segment; `lookup`: containing-address lookup; `by_address` / \
             `by_seq`: collect every segment; `pass_none`: a pass with nothing \
             pending; `pass_kK`: a pass with K pending (K callbacks).\n"
        )
        .unwrap();
        write!(s, "| op | n |").unwrap();
        for i in IMPLS {
            write!(s, " {i} |").unwrap();
        }
        s.push('\n');
        s.push_str("| --- | ---: |");
        for _ in IMPLS {
            s.push_str(" ---: |");
        }
        s.push('\n');
        for g in GROUPS {
            for &n in &sizes {
                if IMPLS.iter().all(|i| est(e, g, i, n).is_none()) {
                    continue;
                }
                let reg = est(e, g, REG, n);
                write!(s, "| {g} | {} |", fmt_n(n)).unwrap();
                for i in IMPLS {
                    match est(e, g, i, n) {
                        None => s.push_str(" n/a |"),
                        Some(ns) if i == REG => write!(s, " {} |", fmt_ns(ns)).unwrap(),
                        Some(ns) => match reg {
                            Some(r) => {
                                write!(s, " {} ({}) |", fmt_ns(ns), fmt_ratio(ns / r)).unwrap()
                            }
                            None => write!(s, " {} |", fmt_ns(ns)).unwrap(),
                        },
                    }
                }
                s.push('\n');
            }
        }
        s.push('\n');
    }

    // Multi thread (a run of only the window-lookup part has no throughput).
    if let Some(mt) = mt.filter(|m| !m.throughput.is_empty()) {
        writeln!(
            s,
            "### Multi-thread throughput (operations per second)\n\n\
             T threads share one map of n live segments; `read-mostly`: 75 % \
             lookups, 25 % untrack + track of a random live segment; \
             `churn-heavy`: 50 / 50. In brackets: registry ÷ implementation \
             (above 1: the registry is faster).\n"
        )
        .unwrap();
        if let Some(name) = svg_name {
            writeln!(s, "![throughput against threads]({name})\n").unwrap();
        }
        write!(s, "| n | mix | T |").unwrap();
        for i in IMPLS {
            write!(s, " {i} |").unwrap();
        }
        s.push('\n');
        s.push_str("| ---: | --- | ---: |");
        for _ in IMPLS {
            s.push_str(" ---: |");
        }
        s.push('\n');
        let mut keys: Vec<(usize, String, usize)> = mt
            .throughput
            .iter()
            .map(|r| (r.n, r.mix.clone(), r.threads))
            .collect();
        keys.sort_by_key(|k| (k.0, k.1 != "read-mostly", k.2));
        keys.dedup();
        for (n, mix, t) in keys {
            let get = |imp: &str| {
                mt.throughput
                    .iter()
                    .find(|r| r.implementation == imp && r.n == n && r.mix == mix && r.threads == t)
                    .map(|r| r.ops_per_sec)
            };
            let reg = get(REG);
            write!(s, "| {} | {mix} | {t} |", fmt_n(n)).unwrap();
            for i in IMPLS {
                match (get(i), reg) {
                    (None, _) => s.push_str(" – |"),
                    (Some(v), Some(r)) if i != REG => {
                        write!(s, " {} ({}) |", fmt_ops(v), fmt_ratio(r / v)).unwrap()
                    }
                    (Some(v), _) => write!(s, " {} |", fmt_ops(v)).unwrap(),
                }
            }
            s.push('\n');
        }
        s.push('\n');

        if !mt.pass_latency.is_empty() {
            writeln!(
                s,
                "### Nothing-pending pass latency\n\n\
                 Median over batches of 100 passes (mean in brackets). \
                 \"after churn\": idle, right after the throughput runs, before \
                 deferred frees were flushed; \"idle\": after flushing; \
                 \"loaded\": while {} threads do lookups on the same map.\n",
                mt.pass_latency[0].lookup_threads
            )
            .unwrap();
            writeln!(
                s,
                "| implementation | n | after churn | idle | loaded | loaded ÷ idle |\n\
                 | --- | ---: | ---: | ---: | ---: | ---: |"
            )
            .unwrap();
            for p in &mt.pass_latency {
                writeln!(
                    s,
                    "| {} | {} | {} | {} ({}) | {} ({}) | {} |",
                    p.implementation,
                    fmt_n(p.n),
                    fmt_ns(p.after_churn_ns),
                    fmt_ns(p.idle_ns),
                    fmt_ns(p.idle_mean_ns),
                    fmt_ns(p.loaded_ns),
                    fmt_ns(p.loaded_mean_ns),
                    fmt_ratio(p.loaded_ns / p.idle_ns)
                )
                .unwrap();
            }
            s.push('\n');
        }
    }

    window_section(&mut s, e, mt, &sizes);

    // Memory.
    if let Some(mem) = mem {
        writeln!(
            s,
            "### Memory per live segment (heap bytes requested, counting allocator)\n\n\
             `tracked`: after n tracks; `after churn`: after 2n untrack + track \
             round trips (deferred frees flushed); `1 comm registered`: after one \
             pass registered every segment (the registry and mutex-btreemap keep \
             the windows).\n"
        )
        .unwrap();
        let mut keys: Vec<(usize, String)> =
            mem.rows.iter().map(|r| (r.n, r.phase.clone())).collect();
        keys.dedup();
        write!(s, "| n | phase |").unwrap();
        for i in IMPLS {
            write!(s, " {i} |").unwrap();
        }
        s.push_str("\n| ---: | --- |");
        for _ in IMPLS {
            s.push_str(" ---: |");
        }
        s.push('\n');
        let mut seen = Vec::new();
        for k in keys {
            if seen.contains(&k) {
                continue;
            }
            seen.push(k.clone());
            write!(s, "| {} | {} |", fmt_n(k.0), k.1).unwrap();
            for i in IMPLS {
                match mem
                    .rows
                    .iter()
                    .find(|r| r.implementation == i && r.n == k.0 && r.phase == k.1)
                {
                    Some(r) => write!(s, " {:.0} B |", r.bytes_per_segment).unwrap(),
                    None => s.push_str(" n/a |"),
                }
            }
            s.push('\n');
        }
        s.push('\n');
    }
    s
}

/// The implementations that keep windows, in column order.
const WINDOW_IMPLS: [&str; 2] = [REG, "mutex-btreemap"];
/// The criterion group of the single-thread window lookup.
const WINDOW_GROUP: &str = "window_of";

/// "Window lookup (issue 9)": ns per lookup per thread for each n and T,
/// from criterion (`window_of`, one thread) and `mt` (T threads), with the
/// registry's speed-up over `Mutex<BTreeMap>` in brackets.
fn window_section(s: &mut String, e: &Estimates, mt: Option<&MtResults>, sizes: &[usize]) {
    let rows_mt: &[results::WindowLookup] = mt.map_or(&[], |m| &m.window_lookup);
    let has_st = sizes.iter().any(|&n| {
        WINDOW_IMPLS
            .iter()
            .any(|i| est(e, WINDOW_GROUP, i, n).is_some())
    });
    if !has_st && rows_mt.is_empty() {
        return;
    }
    writeln!(
        s,
        "### Window lookup (issue 9)\n\n\
         `window_of(comm, ptr, size) -> (window, offset)` for a random range inside \
         a random live segment, every segment registered with one comm. \
         `criterion`: the `st` group `{WINDOW_GROUP}`, one thread, time per lookup. \
         `mt`: T threads doing only lookups on one shared map{}, ns per lookup \
         per thread (T × elapsed ÷ lookups; with more threads than cores it \
         includes waiting for a core) and lookups per second, all threads \
         together. In brackets: mutex-btreemap ÷ registry (above 1: the \
         registry is faster). The other implementations keep no windows.\n",
        mt.filter(|m| m.window_secs_per_point > 0.0)
            .map_or(String::new(), |m| format!(
                " for {} s per point",
                m.window_secs_per_point
            ))
    )
    .unwrap();
    writeln!(
        s,
        "| n | T | measured by | registry ns/lookup | mutex-btreemap ns/lookup | \
         registry lookups/s | mutex-btreemap lookups/s |\n\
         | ---: | ---: | --- | ---: | ---: | ---: | ---: |"
    )
    .unwrap();
    let mut ns: Vec<usize> = sizes
        .iter()
        .copied()
        .filter(|&n| {
            WINDOW_IMPLS
                .iter()
                .any(|i| est(e, WINDOW_GROUP, i, n).is_some())
        })
        .chain(rows_mt.iter().map(|r| r.n))
        .collect();
    ns.sort_unstable();
    ns.dedup();
    // (ns per lookup, lookups per second) for the registry and the baseline.
    let row = |s: &mut String, n: usize, t: usize, by: &str, v: [Option<(f64, f64)>; 2]| {
        write!(s, "| {} | {t} | {by} |", fmt_n(n)).unwrap();
        match v[0] {
            Some((r, _)) => write!(s, " {} |", fmt_ns(r)).unwrap(),
            None => s.push_str(" – |"),
        }
        match (v[1], v[0]) {
            (Some((b, _)), Some((r, _))) => {
                write!(s, " {} ({}) |", fmt_ns(b), fmt_ratio(b / r)).unwrap()
            }
            (Some((b, _)), None) => write!(s, " {} |", fmt_ns(b)).unwrap(),
            (None, _) => s.push_str(" – |"),
        }
        for x in v {
            match x {
                Some((_, ops)) => write!(s, " {} |", fmt_ops(ops)).unwrap(),
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    };
    for n in ns {
        let st = WINDOW_IMPLS.map(|i| est(e, WINDOW_GROUP, i, n).map(|ns| (ns, 1e9 / ns)));
        if st.iter().any(Option::is_some) {
            row(s, n, 1, "criterion", st);
        }
        let mut ts: Vec<usize> = rows_mt
            .iter()
            .filter(|r| r.n == n)
            .map(|r| r.threads)
            .collect();
        ts.sort_unstable();
        ts.dedup();
        for t in ts {
            let v = WINDOW_IMPLS.map(|i| {
                rows_mt
                    .iter()
                    .find(|r| r.implementation == i && r.n == n && r.threads == t)
                    .map(|r| (r.ns_per_lookup, r.lookups_per_sec))
            });
            row(s, n, t, "mt", v);
        }
    }
    s.push('\n');
}

// --------------------------------------------------------------------------
// SVG
// --------------------------------------------------------------------------

const COLORS: [&str; 5] = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#7f7f7f"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Throughput against threads, one panel per (n, mix), log-log axes.
fn svg(mt: &MtResults, title: &str) -> String {
    let mut panels: Vec<(usize, String)> =
        mt.throughput.iter().map(|r| (r.n, r.mix.clone())).collect();
    panels.sort_by_key(|p| (p.0, p.1 != "read-mostly"));
    panels.dedup();
    let cols = 2usize;
    let rows = panels.len().div_ceil(cols).max(1);
    let (pw, ph) = (460.0, 300.0);
    let (ml, mr, mtop, mb) = (70.0, 20.0, 40.0, 45.0);
    let width = cols as f64 * pw;
    let height = rows as f64 * ph + 70.0;
    let mut s = String::new();
    writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    )
    .unwrap();
    writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="20" text-anchor="middle" font-size="15">{}</text>"#,
        width / 2.0,
        esc(title)
    )
    .unwrap();
    // Legend.
    for (i, imp) in IMPLS.iter().enumerate() {
        let x = 20.0 + i as f64 * (width - 40.0) / IMPLS.len() as f64;
        writeln!(
            s,
            r#"<line x1="{x}" y1="40" x2="{}" y2="40" stroke="{}" stroke-width="3"/><text x="{}" y="44">{imp}</text>"#,
            x + 24.0,
            COLORS[i],
            x + 30.0
        )
        .unwrap();
    }
    for (pi, (n, mix)) in panels.iter().enumerate() {
        let ox = (pi % cols) as f64 * pw;
        let oy = 60.0 + (pi / cols) as f64 * ph;
        let pts: Vec<_> = mt
            .throughput
            .iter()
            .filter(|r| r.n == *n && &r.mix == mix && r.ops_per_sec > 0.0)
            .collect();
        if pts.is_empty() {
            continue;
        }
        let tmax = pts.iter().map(|r| r.threads).max().unwrap_or(1).max(2) as f64;
        let lo = pts
            .iter()
            .map(|r| r.ops_per_sec)
            .fold(f64::INFINITY, f64::min)
            .log10()
            .floor();
        let hi = pts
            .iter()
            .map(|r| r.ops_per_sec)
            .fold(0.0, f64::max)
            .log10()
            .ceil()
            .max(lo + 1.0);
        let (x0, x1) = (ox + ml, ox + pw - mr);
        let (y0, y1) = (oy + ph - mb, oy + mtop);
        let fx = |t: f64| x0 + (t.log2() / tmax.log2()) * (x1 - x0);
        let fy = |v: f64| y0 - (v.log10() - lo) / (hi - lo) * (y0 - y1);
        writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">n = {}, {}</text>"#,
            (x0 + x1) / 2.0,
            oy + 22.0,
            fmt_n(*n),
            esc(mix)
        )
        .unwrap();
        writeln!(
            s,
            r##"<rect x="{x0}" y="{y1}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
            x1 - x0,
            y0 - y1
        )
        .unwrap();
        // Y grid: decades.
        let mut d = lo;
        while d <= hi + 1e-9 {
            let y = fy(10f64.powf(d));
            writeln!(
                s,
                r##"<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                x0 - 5.0,
                y + 4.0,
                fmt_ops(10f64.powf(d))
            )
            .unwrap();
            d += 1.0;
        }
        // X ticks: the thread counts measured.
        let mut ts: Vec<usize> = pts.iter().map(|r| r.threads).collect();
        ts.sort_unstable();
        ts.dedup();
        for t in ts {
            let x = fx(t as f64);
            writeln!(
                s,
                r##"<line x1="{x}" y1="{y0}" x2="{x}" y2="{y1}" stroke="#eee"/><text x="{x}" y="{}" text-anchor="middle">{t}</text>"##,
                y0 + 16.0
            )
            .unwrap();
        }
        writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">threads</text><text x="{}" y="{}" text-anchor="middle" transform="rotate(-90 {} {})">ops/s</text>"#,
            (x0 + x1) / 2.0,
            y0 + 34.0,
            ox + 16.0,
            (y0 + y1) / 2.0,
            ox + 16.0,
            (y0 + y1) / 2.0
        )
        .unwrap();
        for (i, imp) in IMPLS.iter().enumerate() {
            let mut line: Vec<_> = pts.iter().filter(|r| r.implementation == *imp).collect();
            line.sort_by_key(|r| r.threads);
            if line.is_empty() {
                continue;
            }
            let path: Vec<String> = line
                .iter()
                .map(|r| format!("{:.1},{:.1}", fx(r.threads as f64), fy(r.ops_per_sec)))
                .collect();
            writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
                path.join(" "),
                COLORS[i]
            )
            .unwrap();
            for r in line {
                writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"><title>{imp}, T={}: {} ops/s</title></circle>"#,
                    fx(r.threads as f64),
                    fy(r.ops_per_sec),
                    COLORS[i],
                    r.threads,
                    fmt_ops(r.ops_per_sec)
                )
                .unwrap();
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

// --------------------------------------------------------------------------
// RESULTS.md
// --------------------------------------------------------------------------

const PREAMBLE: &str = "# Benchmark results\n\n\
Generated by `bench-report` (see `benches/README.md`); each section is one \
machine's run and is replaced when that machine's results are regenerated. \
Hand edits belong above the first section marker.\n\n";

/// Replaces the section for `label` in `doc`, or appends it.
fn splice(doc: &str, label: &str, body: &str) -> String {
    let begin = format!("<!-- bench-report: {label} -->");
    let end = format!("<!-- end bench-report: {label} -->");
    let block = format!("{begin}\n{body}{end}\n");
    match (doc.find(&begin), doc.find(&end)) {
        (Some(b), Some(e)) if e > b => {
            let after = &doc[e + end.len()..];
            format!(
                "{}{block}{}",
                &doc[..b],
                after.strip_prefix('\n').unwrap_or(after)
            )
        }
        _ => {
            let mut d = if doc.trim().is_empty() {
                PREAMBLE.to_string()
            } else {
                doc.to_string()
            };
            if !d.ends_with("\n\n") {
                d.push('\n');
            }
            d.push_str(&block);
            d
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Option<T> {
    let text = std::fs::read_to_string(p).ok()?;
    match serde_json::from_str(&text) {
        Ok(v) => Some(v),
        Err(err) => {
            eprintln!("bench-report: ignoring {}: {err}", p.display());
            None
        }
    }
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let crit_dir = a.criterion.clone().unwrap_or_else(default_criterion_dir);
    let res_dir = a.results.clone().unwrap_or_else(results::results_dir);
    let e = read_criterion(&crit_dir);
    let mt: Option<MtResults> = read_json(&res_dir.join(results::MT_JSON));
    let mem: Option<MemoryResults> = read_json(&res_dir.join(results::MEMORY_JSON));
    eprintln!(
        "bench-report: {} criterion estimates from {}, mt: {}, memory: {} (from {})",
        e.len(),
        crit_dir.display(),
        if mt.is_some() { "yes" } else { "no" },
        if mem.is_some() { "yes" } else { "no" },
        res_dir.display()
    );
    if e.is_empty() && mt.is_none() && mem.is_none() {
        eprintln!("bench-report: nothing to report");
        std::process::exit(1);
    }

    let svg_path = mt.as_ref().filter(|m| !m.throughput.is_empty()).map(|_| {
        a.svg.clone().unwrap_or_else(|| {
            let name = format!("throughput-{}.svg", slug(&a.machine));
            match &a.out {
                Some(out) => out.parent().unwrap_or(Path::new(".")).join(name),
                None => res_dir.join(name),
            }
        })
    });
    // The link is relative to the markdown file when both sit together.
    let svg_link = svg_path.as_ref().map(|p| match (&a.out, p.parent()) {
        (Some(out), Some(dir)) if out.parent().unwrap_or(Path::new(".")) == dir => p
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        _ => p.display().to_string(),
    });
    if let (Some(mt), Some(p)) = (&mt, &svg_path) {
        let title = format!("Throughput against threads: {}", a.machine);
        std::fs::write(p, svg(mt, &title)).expect("write the SVG");
        eprintln!("bench-report: wrote {}", p.display());
    }
    let body = section(&a, &e, mt.as_ref(), mem.as_ref(), svg_link.as_deref());
    match &a.out {
        Some(out) => {
            let doc = std::fs::read_to_string(out).unwrap_or_default();
            std::fs::write(out, splice(&doc, &a.machine, &body)).expect("write the report");
            eprintln!("bench-report: updated {}", out.display());
        }
        None => print!("{body}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_or_appends() {
        let d = splice("", "a", "one\n");
        assert!(d.starts_with("# Benchmark results"));
        let d = splice(&d, "b", "two\n");
        let d = splice(&d, "a", "ONE\n");
        assert!(d.contains("ONE") && !d.contains("one\n") && d.contains("two"));
        assert!(d.find("ONE").unwrap() < d.find("two").unwrap());
    }

    #[test]
    fn window_section_pairs_registry_and_btreemap() {
        let mut e = Estimates::new();
        e.insert(("window_of".into(), REG.into(), 1_000), 20.0);
        e.insert(("window_of".into(), "mutex-btreemap".into(), 1_000), 50.0);
        e.insert(("lookup".into(), REG.into(), 25), 10.0);
        let row = |imp: &str, threads: usize, ns: f64| results::WindowLookup {
            implementation: imp.into(),
            n: 1_000,
            threads,
            secs: 1.0,
            lookups: 1,
            ns_per_lookup: ns,
            lookups_per_sec: threads as f64 * 1e9 / ns,
        };
        let mt = MtResults {
            window_lookup: vec![row(REG, 16, 40.0), row("mutex-btreemap", 16, 4000.0)],
            window_secs_per_point: 1.0,
            ..MtResults::default()
        };
        let mut s = String::new();
        window_section(&mut s, &e, Some(&mt), &[25, 1_000]);
        assert!(s.starts_with("### Window lookup (issue 9)"), "{s}");
        assert!(
            s.contains("| 1,000 | 1 | criterion | 20.0 ns | 50.0 ns (2.50×) |"),
            "{s}"
        );
        assert!(
            s.contains("| 1,000 | 16 | mt | 40.0 ns | 4.00 µs (100×) | 400.00 M |"),
            "{s}"
        );
        assert!(!s.contains("| 25 |"), "{s}");
        let mut empty = String::new();
        window_section(&mut empty, &Estimates::new(), None, &[]);
        assert!(empty.is_empty());
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_ns(12.345), "12.3 ns");
        assert_eq!(fmt_ns(1234.0), "1.23 µs");
        assert_eq!(fmt_n(100_000), "100,000");
        assert_eq!(slug("2-core dev machine"), "2-core-dev-machine");
    }
}
