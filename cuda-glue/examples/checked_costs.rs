//! One-GPU costs of a checked pass, and a check that split, agreement and
//! abort work on one-rank comms (issue "never hang"). Needs CUDA and NCCL
//! 2.28+; run it on the GPU host with `NCCL_NVLS_ENABLE=0`:
//!
//! ```text
//! cargo build --release -p segment-registry-nccl --example checked_costs
//! target/release/examples/checked_costs [ITERATIONS]
//! ```
//!
//! Two one-rank non-blocking comms on GPU 0 share one allocator: comm A is
//! attached checked (its agreement runs on a comm split from it), comm B
//! unchecked. Timed, each ITERATIONS times, in one run: a pass with
//! nothing pending on A (checked) and on B (unchecked), a bare 16-byte
//! all-reduce on A itself, a bare all-reduce of the digest's words on A's
//! agreement comm, and a pass with one new 2 MiB segment on A and on B
//! (the allocation and the free are not timed).

use std::time::{Duration, Instant};

use segment_registry_nccl::real::RealBackend;
use segment_registry_nccl::{Allocator, AttachOptions, Backend, Digest, Wait};

fn main() {
    if let Err(e) = run() {
        eprintln!("checked_costs: {e}");
        std::process::exit(1);
    }
}

/// Median and mean of the samples, in microseconds.
fn summary(mut ns: Vec<u128>) -> (f64, f64) {
    ns.sort_unstable();
    let median = ns[ns.len() / 2] as f64 / 1e3;
    let mean = ns.iter().sum::<u128>() as f64 / ns.len() as f64 / 1e3;
    (median, mean)
}

fn time<T>(f: impl FnOnce() -> T) -> (T, u128) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed().as_nanos())
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let iterations: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2_000);
    let wait = Wait::give_up_after(Duration::from_secs(60));
    check_split_agreement_abort(&wait)?;

    let backend = RealBackend::new()?;
    println!("NCCL version {}", backend.nccl_version());
    let a = backend.comm_init_one_rank_nonblocking(0, &wait)?;
    let b = backend.comm_init_one_rank_nonblocking(0, &wait)?;
    let alloc = Allocator::new(backend);
    let checked = alloc.attach_with(a, AttachOptions::new().checked().owned())?;
    let unchecked = alloc.attach_with(b, AttachOptions::new().owned())?;
    alloc.backend().all_reduce_setup(a)?;

    let agreement = alloc
        .agreement_comm(checked)
        .ok_or("a checked comm has an agreement comm")?;
    let (mut c_none, mut u_none, mut bare, mut bare_digest, mut c_one, mut u_one) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let unbounded = Wait::unbounded();
    for i in 0..iterations + 100 {
        let warm = i < 100;
        // The agreement's own all-reduce, bare, and the checked pass, in
        // turns first: each then meets the GPU and caches as often right
        // after the previous iteration's frees.
        let digest_first = i % 2 == 0;
        let mut bare_digest_all_reduce = || -> Result<(), Box<dyn std::error::Error>> {
            let mut digest = Digest::default().reduction_input();
            let (r, t) = time(|| {
                alloc
                    .backend()
                    .all_reduce_max_u64(agreement, &mut digest, &unbounded)
            });
            r?;
            if !warm {
                bare_digest.push(t);
            }
            Ok(())
        };
        if digest_first {
            bare_digest_all_reduce()?;
        }
        let (r, t) = time(|| alloc.register(checked));
        assert_eq!(r?.registered.len(), 0);
        if !warm {
            c_none.push(t);
        }
        if !digest_first {
            bare_digest_all_reduce()?;
        }
        let (r, t) = time(|| alloc.register(unchecked));
        assert_eq!(r?.registered.len(), 0);
        if !warm {
            u_none.push(t);
        }
        let mut words = [7u64, 9];
        let (r, t) = time(|| {
            alloc
                .backend()
                .all_reduce_max_u64(a, &mut words, &unbounded)
        });
        r?;
        assert_eq!(words, [7, 9], "a one-rank max all-reduce is the identity");
        if !warm {
            bare.push(t);
        }
        let p = alloc.alloc(2 << 20, 0)?;
        let (r, t) = time(|| alloc.register(checked));
        assert_eq!(r?.registered.len(), 1);
        if !warm {
            c_one.push(t);
        }
        let (r, t) = time(|| alloc.register(unchecked));
        assert_eq!(r?.registered.len(), 1);
        if !warm {
            u_one.push(t);
        }
        alloc.free(p)?;
    }
    let (bare_med, bare_mean) = summary(bare);
    println!("{iterations} iterations each, after 100 warm-up ones; microseconds");
    println!("| call | median | mean | median / bare all-reduce |");
    println!("|---|---|---|---|");
    for (name, v) in [
        (
            "bare all-reduce of the digest (80 bytes) on the agreement comm",
            bare_digest,
        ),
        ("checked pass, nothing pending", c_none),
        ("unchecked pass, nothing pending", u_none),
        ("checked pass, one 2 MiB segment", c_one),
        ("unchecked pass, one 2 MiB segment", u_one),
    ] {
        let (med, mean) = summary(v);
        println!("| {name} | {med:.2} | {mean:.2} | {:.2} |", med / bare_med);
    }
    println!("| bare 16-byte all-reduce (max, u64) | {bare_med:.2} | {bare_mean:.2} | 1.00 |");
    for id in [checked, unchecked] {
        alloc.detach(id)?;
    }
    alloc.backend().all_reduce_teardown(a);
    let s = alloc.stats();
    println!(
        "windows registered {}, deregistered {}, ncclMemFree {} ok / {} failed",
        s.windows_registered, s.windows_deregistered, s.mem_frees, s.mem_free_failures
    );
    assert_eq!(s.windows_registered, s.windows_deregistered);
    assert_eq!(s.mem_free_failures, 0);
    Ok(())
}

/// Split a one-rank non-blocking comm, all-reduce on the split comm, then
/// abort both: the calls the glue's agreement and deadline rely on.
fn check_split_agreement_abort(wait: &Wait<'_>) -> Result<(), Box<dyn std::error::Error>> {
    let b = RealBackend::new()?;
    let parent = b.comm_init_one_rank_nonblocking(0, wait)?;
    let child = b.comm_split(parent, wait)?;
    b.all_reduce_setup(child)?;
    let mut words = [1u64, u64::MAX - 1, 42];
    b.all_reduce_max_u64(child, &mut words, wait)?;
    assert_eq!(words, [1, u64::MAX - 1, 42]);
    b.all_reduce_teardown(child);
    b.comm_abort(child)?;
    b.comm_abort(parent)?;
    println!("split, agreement all-reduce and abort on one-rank comms: ok");
    Ok(())
}
