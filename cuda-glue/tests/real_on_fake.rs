//! The real backend (`RealBackend`, NCCL and the CUDA driver through
//! cudarc) on the fake CUDA/NCCL of `multi-gpu/fake/`, each test in a child
//! process whose `LD_LIBRARY_PATH` names the fake. The fake's controls make
//! the interleavings deterministic.
#![cfg(not(feature = "loom"))]

mod fake;

use std::thread;

use segment_registry_nccl::real::RealBackend;
use segment_registry_nccl::Allocator;

const MIB: usize = 1 << 20;

/// A free and an alloc of the same address race: the alloc gets the block
/// back while the free is still inside `ncclMemFree`. Both allocations
/// must reach `ncclMemFree`, and the fake must hold nothing at the end.
#[test]
fn an_alloc_inside_a_free_of_its_address_loses_nothing() {
    if !fake::in_child("an_alloc_inside_a_free_of_its_address_loses_nothing") {
        return;
    }
    let backend = RealBackend::new().expect("the real backend on the fake library");
    let fake = fake::Controls::load();
    let al = Allocator::new(backend);
    let p = al.alloc(2 * MIB, 0).unwrap();
    fake.pause_next_free();
    thread::scope(|s| {
        let _resume = fake.resume_on_drop();
        let freeing = s.spawn(|| al.free(p));
        assert!(fake.wait_paused(10), "the free never reached ncclMemFree");
        // ncclMemFree has given the block back and has not returned.
        let q = al.alloc(2 * MIB, 0).expect("an alloc inside the free");
        assert_eq!(q, p, "the fake hands the block freed last back first");
        fake.resume_free();
        freeing.join().unwrap().unwrap();
        al.free(q).unwrap();
    });
    let s = al.stats();
    assert_eq!(
        (s.mem_frees, s.mem_free_failures, fake.outstanding()),
        (2, 0, (0, 0)),
        "ncclMemFree calls (done, refused by the backend), and the bytes and \
         blocks the fake still holds; last error: {:?}",
        al.last_async_error()
    );
}
