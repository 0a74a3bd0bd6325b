//! Real-GPU tests on NCCL (one process, one GPU, one-rank comms). Ignored by
//! default; run them on the device machine as gpu/README.md says:
//!
//! ```text
//! NCCL_NVLS_ENABLE=0 LD_LIBRARY_PATH=<folder with libnccl.so> \
//!     ./gpu_real-<hash> --ignored --test-threads=1 --nocapture
//! ```
//!
//! * two one-rank comms on one GPU sharing segments: alloc → pass (both
//!   comms) → all-reduce on the registered buffers, right result → free
//!   with deregistration → detach;
//! * 1,000 alloc/register/free cycles: `cuMemGetInfo` stays within 2 MiB of
//!   the start;
//! * the control: the same cycles without deregistration lose memory;
//! * checked comms (NEVER_HANG.md), not yet run on a GPU: a checked attach
//!   of a blocking one-rank comm (split, warm-up all-reduce), its passes,
//!   an abstain, detach; and an owned non-blocking comm whose every call
//!   is polled (`ncclInProgress`).
#![cfg(not(feature = "loom"))]

use std::ffi::c_void;

use cudarc::driver::result as drv;
use cudarc::driver::sys::CUdeviceptr;
use cudarc::nccl::result as nccl;
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t};
use segment_registry_nccl::real::RealBackend;
use segment_registry_nccl::{
    Allocator, AttachOptions, Backend, RawComm, RegisterError, Wait, NCCL_WIN_COLL_SYMMETRIC,
};

const MIB: usize = 1 << 20;
const DEV: i32 = 0;

fn backend() -> RealBackend {
    match RealBackend::new() {
        Ok(b) => {
            println!("NCCL version {}", b.nccl_version());
            b
        }
        Err(e) => panic!("real NCCL unavailable ({e}); see cuda-glue/gpu/README.md"),
    }
}

fn free_mib(b: &RealBackend) -> f64 {
    b.mem_get_info(DEV).unwrap().0 as f64 / MIB as f64
}

/// Sums `src` into `dst` over the one-rank comm and waits for it.
fn all_reduce(comm: RawComm, src: usize, dst: usize, count: usize) {
    // SAFETY: both buffers are ncclMemAlloc memory of `count` f32 on the
    // comm's device (current on this thread); default stream, then a
    // context-wide synchronize before anyone reads the result.
    unsafe {
        nccl::all_reduce(
            src as *const c_void,
            dst as *mut c_void,
            count,
            ncclDataType_t::ncclFloat32,
            ncclRedOp_t::ncclSum,
            comm.0 as ncclComm_t,
            std::ptr::null_mut(),
        )
    }
    .expect("ncclAllReduce");
    drv::ctx::synchronize().expect("cuCtxSynchronize");
}

fn upload(dst: usize, data: &[f32]) {
    // SAFETY: `dst` holds at least `data.len()` f32 of device memory.
    unsafe { drv::memcpy_htod_sync(dst as CUdeviceptr, data) }.expect("cuMemcpyHtoD");
}

fn download(src: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    // SAFETY: `src` holds at least `n` f32 of device memory.
    unsafe { drv::memcpy_dtoh_sync(&mut out, src as CUdeviceptr) }.expect("cuMemcpyDtoH");
    out
}

#[test]
#[ignore = "needs a GPU and NCCL >= 2.28 (cuda-glue/gpu/README.md)"]
fn gpu_two_comms_share_segments_allreduce_and_free() {
    let b = backend();
    // This thread uses the driver and NCCL directly below (memcpy,
    // all-reduce): make the device current and leave it so. The backend's
    // own calls restore whatever context the thread had.
    b.bind_device(DEV).unwrap();
    let c1 = b.comm_init_one_rank(DEV).unwrap();
    let c2 = b.comm_init_one_rank(DEV).unwrap();
    let al = Allocator::new(b);
    let (id1, id2) = (al.attach(c1).unwrap(), al.attach(c2).unwrap());

    let n = MIB; // f32 elements: 4 MiB buffers
    let x = al.alloc(4 * MIB, DEV).unwrap();
    let y = al.alloc(4 * MIB, DEV).unwrap();
    for (id, r) in al.register_all() {
        let s = r.unwrap();
        println!(
            "{id}: registered {} ({} windows, {} null)",
            s.registered.len(),
            s.windows,
            s.null_windows
        );
        assert_eq!(s.registered.len(), 2);
        assert_eq!(s.windows + s.null_windows, 2);
    }
    let st = al.stats();
    let windows = st.windows_registered as usize;
    assert_eq!(st.comms.len(), 2);

    let data: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.5).collect();
    upload(x, &data);
    upload(y, &vec![0f32; n]);
    all_reduce(c1, x, y, n);
    assert_eq!(
        download(y, n),
        data,
        "all-reduce on comm 1 into a registered buffer"
    );
    all_reduce(c2, y, y, n); // in place, on the other comm
    assert_eq!(download(y, n), data, "in-place all-reduce on comm 2");

    let fx = al.free(x).unwrap();
    let fy = al.free(y).unwrap();
    assert_eq!(
        fx.windows + fy.windows,
        windows,
        "every window deregistered by free"
    );
    let st = al.stats();
    assert_eq!(st.windows_deregistered, st.windows_registered);
    assert_eq!(
        (st.mem_frees, st.live_segments, st.pending_frees),
        (2, 0, 0)
    );
    assert_eq!(
        st.deregister_failures + st.mem_free_failures,
        0,
        "{:?}",
        al.last_async_error()
    );
    al.detach(id1).unwrap();
    al.detach(id2).unwrap();
    for c in [c1, c2] {
        // SAFETY: made above, detached, used by nobody else.
        unsafe { al.backend().comm_destroy(c) }.unwrap();
    }
}

#[test]
#[ignore = "needs a GPU and NCCL >= 2.28 (cuda-glue/gpu/README.md)"]
fn gpu_churn_1000_cycles_keeps_device_memory_flat() {
    let b = backend();
    let c = b.comm_init_one_rank(DEV).unwrap();
    let al = Allocator::new(b);
    let id = al.attach(c).unwrap();
    let cycle = |al: &Allocator<RealBackend>| {
        let p = al.alloc(2 * MIB, DEV).unwrap();
        assert_eq!(al.register(id).unwrap().registered.len(), 1);
        al.free(p).unwrap();
    };
    for _ in 0..10 {
        cycle(&al); // warm up NCCL's own registration resources
    }
    let start = free_mib(al.backend());
    let mut low = start;
    for i in 0..1000 {
        cycle(&al);
        if i % 100 == 99 {
            let now = free_mib(al.backend());
            low = low.min(now);
            println!("cycle {}: {now:.1} MiB free (start {start:.1})", i + 1);
        }
    }
    let end = free_mib(al.backend());
    println!("start {start:.1} MiB, end {end:.1} MiB, lowest {low:.1} MiB");
    assert!(
        start - end <= 2.0,
        "lost {:.1} MiB over 1000 cycles",
        start - end
    );
    let st = al.stats();
    assert_eq!(st.allocs, st.mem_frees);
    assert_eq!(st.windows_registered, st.windows_deregistered);
    assert_eq!(
        st.register_failures + st.deregister_failures + st.mem_free_failures,
        0
    );
    al.detach(id).unwrap();
    // SAFETY: made above, detached, used by nobody else.
    unsafe { al.backend().comm_destroy(c) }.unwrap();
}

#[test]
#[ignore = "needs a GPU and NCCL >= 2.28 (cuda-glue/gpu/README.md)"]
fn gpu_control_without_deregistration_memory_grows() {
    let b = backend();
    let c = b.comm_init_one_rank(DEV).unwrap();
    // Warm up with proper cycles.
    for _ in 0..10 {
        let p = b.mem_alloc(2 * MIB, DEV).unwrap();
        if let Some(w) = b
            .comm_window_register(c, p, 2 * MIB, NCCL_WIN_COLL_SYMMETRIC)
            .unwrap()
        {
            b.comm_window_deregister(c, w).unwrap();
        }
        b.mem_free(p).unwrap();
    }
    let start = free_mib(&b);
    let cycles = 200;
    let mut windows = 0;
    for _ in 0..cycles {
        let p = b.mem_alloc(2 * MIB, DEV).unwrap();
        let w = b
            .comm_window_register(c, p, 2 * MIB, NCCL_WIN_COLL_SYMMETRIC)
            .unwrap();
        windows += usize::from(w.is_some());
        b.mem_free(p).unwrap(); // the bug under test: no deregistration
    }
    let end = free_mib(&b);
    println!("control: {windows} windows leaked; start {start:.1} MiB, end {end:.1} MiB");
    assert_eq!(
        windows, cycles,
        "NCCL returned null windows: no symmetric support here"
    );
    assert!(
        start - end >= (cycles as f64) * 2.0 / 4.0,
        "expected the leaked windows to keep memory: lost only {:.1} MiB",
        start - end
    );
    // Destroying the comm releases them.
    // SAFETY: made above, used by nobody else, never used again.
    unsafe { b.comm_destroy(c) }.unwrap();
    println!("after ncclCommDestroy: {:.1} MiB free", free_mib(&b));
}

#[test]
#[ignore = "needs a GPU and NCCL >= 2.28 (cuda-glue/gpu/README.md)"]
fn gpu_checked_attach_passes_abstain_and_detach_on_one_rank() {
    let b = backend();
    let c = b.comm_init_one_rank(DEV).unwrap();
    let al = Allocator::new(b);
    let opts = AttachOptions::new()
        .checked()
        .deadline(std::time::Duration::from_secs(60));
    let id = al.attach_with(c, opts).expect("split + warm-up all-reduce");
    let p = al.alloc(4 * MIB, DEV).unwrap();
    assert_eq!(al.register(id).unwrap().windows, 1);
    assert!(
        al.register(id).unwrap().registered.is_empty(),
        "nothing pending"
    );
    assert!(matches!(al.abstain(id), RegisterError::Diverged(_)));
    al.free(p).unwrap();
    al.detach(id).expect("detach destroys the agreement comm");
    let s = al.stats();
    println!(
        "checked: {} agreements, {} diverged",
        s.agreements, s.diverged
    );
    assert_eq!((s.windows_registered, s.windows_deregistered), (1, 1));
    // SAFETY: made above, detached, used by nobody else, never used again.
    unsafe { al.backend().comm_destroy(c) }.unwrap();
}

#[test]
#[ignore = "needs a GPU and NCCL >= 2.28 (cuda-glue/gpu/README.md)"]
fn gpu_owned_non_blocking_comm_polls_every_call() {
    let b = backend();
    let c = b
        .comm_init_one_rank_nonblocking(DEV, &Wait::unbounded())
        .expect("ncclCommInitRankConfig, blocking = 0");
    let al = Allocator::new(b);
    let opts = AttachOptions::new()
        .checked()
        .owned()
        .deadline(std::time::Duration::from_secs(60));
    let id = al.attach_with(c, opts).unwrap();
    for _ in 0..10 {
        let p = al.alloc(2 * MIB, DEV).unwrap();
        assert_eq!(al.register(id).unwrap().windows, 1);
        al.free(p).unwrap();
    }
    al.detach(id).unwrap();
    let s = al.stats();
    assert_eq!(
        (s.windows_registered, s.windows_deregistered, s.timeouts),
        (10, 10, 0)
    );
    // SAFETY: made above, detached, used by nobody else, never used again.
    unsafe { al.backend().comm_destroy(c) }.unwrap();
}
