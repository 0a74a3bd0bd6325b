//! `include/segment_registry.h` matches the library: the same functions as
//! the cdylib exports (read from its ELF dynamic symbol table), with the
//! same parameter and return types as `src/capi/mod.rs` declares, the same
//! stats struct, and the same `SEGREG_*` return codes.
#![cfg(not(feature = "loom"))]

mod cdylib;

use std::collections::BTreeMap;
use std::path::Path;

use segment_registry_nccl::capi::SegregStats;

const HEADER: &str = include_str!("../include/segment_registry.h");
const CAPI: &str = include_str!("../src/capi/mod.rs");

/// Collapses whitespace and puts `*` next to the type (`void *p` →
/// `void* p`).
fn norm(s: &str) -> String {
    let s = s.replace('*', " * ");
    let mut out = String::new();
    for tok in s.split_whitespace() {
        if tok == "*" {
            out.push('*');
        } else {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(tok);
        }
    }
    out
}

/// Function name → (return type, parameter types), from the header.
fn header_functions() -> BTreeMap<String, (String, Vec<String>)> {
    let mut text = String::new();
    for line in HEADER.lines() {
        // Drop comments (block comments here are whole lines or trailing).
        let line = line.split("/*").next().unwrap_or("");
        if line.trim_start().starts_with('*') || line.trim_start().starts_with('#') {
            continue;
        }
        text.push_str(line);
        text.push('\n');
    }
    let mut out = BTreeMap::new();
    for stmt in text.split(';') {
        let stmt = stmt.trim();
        let Some(open) = stmt.find("segreg_") else {
            continue;
        };
        let Some(paren) = stmt[open..].find('(').map(|p| p + open) else {
            continue;
        };
        if stmt.contains("typedef") || stmt.contains('{') {
            continue;
        }
        let name = stmt[open..paren].trim().to_string();
        let ret = norm(&stmt[..open]);
        let params = &stmt[paren + 1..stmt.rfind(')').unwrap()];
        let types = if params.trim() == "void" {
            Vec::new()
        } else {
            params
                .split(',')
                .map(|p| {
                    // Drop the parameter name (the last identifier).
                    let p = norm(p);
                    let cut = p.rfind([' ', '*']).map_or(0, |i| i + 1);
                    norm(&p[..cut])
                })
                .collect()
        };
        out.insert(name, (ret, types));
    }
    out
}

/// The C spelling of a Rust type used in `capi/mod.rs`.
fn c_type(rust: &str) -> String {
    match rust.trim() {
        "" | "()" => "void",
        "c_int" => "int",
        "usize" => "size_t",
        "i64" => "int64_t",
        "*mut c_void" => "void*",
        "*mut *mut c_void" => "void**",
        "*mut usize" => "size_t*",
        "*const c_char" => "const char*",
        "CudaStream" => "cudaStream_t",
        "*mut SegregStats" => "segreg_stats_t*",
        "Option<SegregAbortFn>" => "segreg_abort_fn",
        other => panic!("no C spelling for Rust type {other:?}"),
    }
    .to_string()
}

/// Function name → (return type, parameter types), from `capi/mod.rs`'s
/// `extern "C" fn`s, in C spelling.
fn rust_functions() -> BTreeMap<String, (String, Vec<String>)> {
    let mut out = BTreeMap::new();
    let mut rest = CAPI;
    while let Some(i) = rest.find("extern \"C\" fn segreg_") {
        let sig = &rest[i + "extern \"C\" fn ".len()..];
        let body = sig.find('{').unwrap();
        let sig = &sig[..body];
        let open = sig.find('(').unwrap();
        let close = sig.rfind(')').unwrap();
        let name = sig[..open].trim().to_string();
        let params = sig[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| c_type(p.split_once(':').unwrap().1))
            .collect();
        let ret = sig[close + 1..].trim().trim_start_matches("->");
        out.insert(name, (c_type(ret), params));
        rest = &rest[i + body..];
    }
    out
}

/// Defined global function symbols of an ELF64 little-endian shared object.
fn exported_functions(path: &Path) -> Vec<String> {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..4], b"\x7fELF");
    assert_eq!((b[4], b[5]), (2, 1), "ELF64 little-endian");
    let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c));
    let section = |i: usize| shoff + i * shentsize;
    let mut names = Vec::new();
    for i in 0..shnum {
        let sh = section(i);
        if u32_at(sh + 4) != 11 {
            continue; // not SHT_DYNSYM
        }
        let (off, size, entsize) = (u64_at(sh + 0x18), u64_at(sh + 0x20), u64_at(sh + 0x38));
        let strtab = u64_at(section(u32_at(sh + 0x28)) + 0x18);
        for s in (off..off + size).step_by(entsize) {
            let (info, shndx) = (b[s + 4], u16_at(s + 6));
            let (bind, kind) = (info >> 4, info & 0xf);
            if shndx == 0 || kind != 2 || !(bind == 1 || bind == 2) {
                continue; // undefined, not a function, or local
            }
            let start = strtab + u32_at(s);
            let end = start + b[start..].iter().position(|&c| c == 0).unwrap();
            names.push(String::from_utf8_lossy(&b[start..end]).into_owned());
        }
    }
    names
}

#[test]
fn header_declares_exactly_the_exported_functions() {
    let header: Vec<String> = header_functions().into_keys().collect();
    let mut exported: Vec<String> = exported_functions(&cdylib::cdylib_path())
        .into_iter()
        .filter(|n| n.starts_with("segreg_"))
        .collect();
    exported.sort();
    assert!(header.len() >= 14, "{header:?}");
    assert_eq!(header, exported);
}

#[test]
fn header_signatures_match_the_rust_definitions() {
    let header = header_functions();
    let rust = rust_functions();
    assert_eq!(
        header.keys().collect::<Vec<_>>(),
        rust.keys().collect::<Vec<_>>()
    );
    for (name, sig) in &header {
        assert_eq!(sig, &rust[name], "{name}");
    }
    // The PyTorch CUDAPluggableAllocator shapes.
    assert_eq!(
        header["segreg_alloc"],
        (
            "void*".into(),
            vec!["size_t".into(), "int".into(), "cudaStream_t".into()]
        )
    );
    assert_eq!(
        header["segreg_free"],
        (
            "void".into(),
            vec![
                "void*".into(),
                "size_t".into(),
                "int".into(),
                "cudaStream_t".into()
            ]
        )
    );
}

#[test]
fn header_return_codes_match_the_rust_constants() {
    // `#define SEGREG_X (-n)` in the header.
    let header: BTreeMap<String, i32> = HEADER
        .lines()
        .filter_map(|l| l.trim().strip_prefix("#define SEGREG_"))
        .map(|l| {
            let mut it = l.split_whitespace();
            let name = format!("SEGREG_{}", it.next().unwrap());
            let value = it.next().unwrap().trim_matches(['(', ')']);
            (name, value.parse().unwrap())
        })
        .collect();
    // `pub const SEGREG_X: c_int = -n;` in capi/mod.rs.
    let rust: BTreeMap<String, i32> = CAPI
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const SEGREG_"))
        .map(|l| {
            let (name, rest) = l.split_once(':').unwrap();
            let value = rest.split_once('=').unwrap().1.trim().trim_end_matches(';');
            (format!("SEGREG_{name}"), value.parse().unwrap())
        })
        .collect();
    assert_eq!(header, rust);
    assert_eq!(header.len(), 15, "{header:?}");
    assert_eq!(header["SEGREG_OK"], segment_registry_nccl::capi::SEGREG_OK);
    assert_eq!(
        header["SEGREG_ERR_NO_WINDOW"],
        segment_registry_nccl::capi::SEGREG_ERR_NO_WINDOW
    );
    // Distinct codes, one per answer.
    let mut values: Vec<i32> = header.values().copied().collect();
    values.sort_unstable();
    values.dedup();
    assert_eq!(values.len(), header.len());
    // HCCL's shape: (comm, ptr, size, &win, &offset) -> int.
    assert_eq!(
        header_functions()["segreg_window_get"],
        (
            "int".into(),
            vec![
                "void*".into(),
                "void*".into(),
                "size_t".into(),
                "void**".into(),
                "size_t*".into()
            ]
        )
    );
}

/// A C program that uses every declaration of the header.
const USES_EVERY_DECLARATION: &str = r#"
#include "segment_registry.h"
int main(void) {
    struct segreg_stats s1;
    segreg_stats_t s2;
    void *win = NULL;
    size_t offset = 0;
    int codes[] = {SEGREG_OK, SEGREG_ERR_INVALID, SEGREG_ERR_NOT_ATTACHED,
                   SEGREG_ERR_NOT_TRACKED, SEGREG_ERR_CROSSES_END,
                   SEGREG_ERR_NOT_REGISTERED, SEGREG_ERR_NO_WINDOW,
                   SEGREG_ERR_INTERNAL, SEGREG_ERR_DIVERGED, SEGREG_ERR_TIMEOUT,
                   SEGREG_ERR_ABORTED, SEGREG_ERR_FAILED, SEGREG_ERR_BUSY,
                   SEGREG_ERR_AGREEMENT, SEGREG_ERR_NOT_CHECKED};
    segreg_abort_fn abort_hook = NULL;
    size_t registered = 0;
    cudaStream_t stream = NULL;
    void *comm = segreg_sim_comm_create();
    void *nosym = segreg_sim_comm_create_nosym();
    void *p = segreg_alloc(1, 0, stream);
    void *nb = segreg_sim_comm_create_nonblocking();
    int64_t id = segreg_attach(comm) + segreg_sim_violations()
               + segreg_attach_checked(comm, 0)
               + segreg_attach_nonblocking(nb, 1, 100, abort_hook, NULL);
    int n = segreg_init() + segreg_init_sim() + segreg_register(comm)
          + segreg_register_all() + segreg_detach(comm)
          + segreg_stats(&s1, sizeof s1) + segreg_stats(&s2, sizeof s2)
          + segreg_window_get(comm, p, 1, &win, &offset)
          + segreg_sim_comm_destroy(nosym) + codes[0]
          + segreg_register_status(comm, &registered) + segreg_abstain(comm)
          + segreg_sim_stall_next_register(nb) + segreg_sim_comm_abort(nb);
    const char *e = segreg_last_error();
    const char *b = segreg_backend();
    segreg_free(p, 1, 0, stream);
    return n + (int)id + (e != b);
}
"#;

/// The header compiles as C (C99 and C11) and as C++ with the machine's
/// compilers, warnings as errors (skipped, with a note, where none is
/// installed).
#[test]
fn header_compiles_as_c_and_cpp() {
    let dir = std::env::temp_dir().join(format!("segreg-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/include");
    let mut compiled = 0;
    for (compiler, file, std) in [
        ("cc", "use.c", "-std=c99"),
        ("cc", "use.c", "-std=c11"),
        ("c++", "use.cc", "-std=c++17"),
    ] {
        let src = dir.join(file);
        std::fs::write(&src, USES_EVERY_DECLARATION).unwrap();
        let out = std::process::Command::new(compiler)
            .args([
                std,
                "-Wall",
                "-Wextra",
                "-Werror",
                "-fsyntax-only",
                "-I",
                include,
            ])
            .arg(&src)
            .output();
        match out {
            Ok(o) => {
                assert!(
                    o.status.success(),
                    "{compiler} {std}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                compiled += 1;
            }
            Err(e) => println!("{compiler} not run ({e}): header not compiled as {std}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("header compiled {compiled} time(s)");
}

/// The fields of `segreg_stats_t` as published, in order: the struct only
/// grows at the end (a new field is appended here and everywhere else).
const PUBLISHED_STATS: [&str; 23] = [
    "live_segments",
    "live_bytes",
    "allocs",
    "alloc_failures",
    "frees",
    "bad_frees",
    "passes",
    "windows_registered",
    "null_windows",
    "register_failures",
    "windows_deregistered",
    "windows_live",
    "deregisters_deferred",
    "handed_back",
    "deregister_failures",
    "windows_stuck",
    "pending_frees",
    "mem_frees",
    "mem_free_failures",
    "comms_attached",
    "comms_failed",
    "sim_violations",
    "orphans",
];

/// The `uint64_t` fields of `segreg_stats_t` in the header, in order.
fn header_stats_fields() -> Vec<&'static str> {
    let start = HEADER.find("typedef struct segreg_stats {").unwrap();
    let end = start + HEADER[start..].find('}').unwrap();
    let body = &HEADER[start..end];
    let fields: Vec<&str> = body
        .lines()
        .skip(1)
        .filter_map(|l| l.trim().strip_prefix("uint64_t "))
        .map(|l| l.split(';').next().unwrap().trim())
        .collect();
    let declarations = body.lines().skip(1).filter(|l| l.contains(';')).count();
    assert_eq!(declarations, fields.len(), "every field is a uint64_t");
    fields
}

#[test]
fn header_stats_struct_matches_the_rust_struct() {
    let rust: Vec<&str> = SegregStats::FIELDS.iter().map(|&(name, _)| name).collect();
    assert_eq!(header_stats_fields(), rust);
    assert!(
        rust.starts_with(&PUBLISHED_STATS),
        "segreg_stats_t only grows at the end: {rust:?}"
    );
    for (i, &(name, offset)) in SegregStats::FIELDS.iter().enumerate() {
        assert_eq!(offset, 8 * i, "offset of {name}");
    }
    assert_eq!(size_of::<SegregStats>(), 8 * SegregStats::FIELDS.len());
}

/// The C compiler lays `segreg_stats_t` out as the Rust struct is: its size
/// and every field's offset (skipped, with a note, without a C compiler).
#[test]
fn header_stats_layout_in_c_is_the_rust_layout() {
    let mut src = format!(
        "#include <stddef.h>\n#include \"segment_registry.h\"\n\
         _Static_assert(sizeof(segreg_stats_t) == {}, \"size\");\n",
        size_of::<SegregStats>()
    );
    for &(name, offset) in SegregStats::FIELDS {
        src.push_str(&format!(
            "_Static_assert(offsetof(segreg_stats_t, {name}) == {offset}, \"{name}\");\n"
        ));
    }
    let dir = std::env::temp_dir().join(format!("segreg-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("layout.c");
    std::fs::write(&file, src).unwrap();
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/include");
    let out = std::process::Command::new("cc")
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fsyntax-only",
            "-I",
            include,
        ])
        .arg(&file)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    match out {
        Ok(o) => assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => println!("cc not run ({e}): layout not checked in C"),
    }
}

#[test]
fn python_script_stats_fields_match_the_header() {
    const PY: &str = include_str!("../gpu/torch_mempool.py");
    let start = PY.find("STATS_FIELDS = [").unwrap();
    let end = start + PY[start..].find(']').unwrap();
    let py_fields: Vec<&str> = PY[start..end]
        .lines()
        .skip(1)
        .map(|l| l.trim().trim_end_matches(',').trim_matches('"'))
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(py_fields, header_stats_fields());
}

#[test]
fn the_export_macro_lists_exactly_the_header_functions() {
    let header: Vec<String> = header_functions().into_keys().collect();
    let mut listed: Vec<String> = segment_registry_nccl::capi::ENTRY_POINTS
        .iter()
        .map(|s| s.to_string())
        .collect();
    listed.sort();
    assert_eq!(header, listed);
}
