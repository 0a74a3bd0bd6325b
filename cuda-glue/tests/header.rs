//! `include/segment_registry.h` matches the library: the same functions as
//! the cdylib exports (read from its ELF dynamic symbol table), with the
//! same parameter and return types as `src/capi.rs` declares, and the same
//! stats struct.
#![cfg(not(feature = "loom"))]

mod cdylib;

use std::collections::BTreeMap;
use std::path::Path;

use segment_registry_nccl::capi::SegregStats;

const HEADER: &str = include_str!("../include/segment_registry.h");
const CAPI: &str = include_str!("../src/capi.rs");

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

/// The C spelling of a Rust type used in `capi.rs`.
fn c_type(rust: &str) -> String {
    match rust.trim() {
        "" | "()" => "void",
        "c_int" => "int",
        "usize" => "size_t",
        "i64" => "int64_t",
        "*mut c_void" => "void*",
        "*const c_char" => "const char*",
        "CudaStream" => "cudaStream_t",
        "*mut SegregStats" => "segreg_stats*",
        other => panic!("no C spelling for Rust type {other:?}"),
    }
    .to_string()
}

/// Function name → (return type, parameter types), from `capi.rs`'s
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
fn header_stats_struct_matches_the_rust_struct() {
    let start = HEADER.find("typedef struct segreg_stats {").unwrap();
    let end = start + HEADER[start..].find('}').unwrap();
    let header_fields: Vec<&str> = HEADER[start..end]
        .lines()
        .skip(1)
        .filter_map(|l| l.trim().strip_prefix("uint64_t "))
        .map(|l| l.split(';').next().unwrap().trim())
        .collect();
    let start = CAPI.find("pub struct SegregStats {").unwrap();
    let end = start + CAPI[start..].find('}').unwrap();
    let rust_fields: Vec<&str> = CAPI[start..end]
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub "))
        .filter_map(|l| l.strip_suffix(": u64,"))
        .collect();
    assert_eq!(header_fields, rust_fields);
    assert_eq!(header_fields.len() * 8, size_of::<SegregStats>());
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
    let start = HEADER.find("typedef struct segreg_stats {").unwrap();
    let end = start + HEADER[start..].find('}').unwrap();
    let header_fields: Vec<&str> = HEADER[start..end]
        .lines()
        .filter_map(|l| l.trim().strip_prefix("uint64_t "))
        .map(|l| l.split(';').next().unwrap().trim())
        .collect();
    assert_eq!(py_fields, header_fields);
}
