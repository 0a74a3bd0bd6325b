//! The C statistics struct's derived rows: the figures `SegregStats` computes
//! from the comms' rows and the simulator, rather than copies of a counter.
#![cfg(not(feature = "loom"))]

use segment_registry_nccl::capi::SegregStats;
use segment_registry_nccl::sim::{SimOp, SimWorld};
use segment_registry_nccl::{Allocator, CommState, RegisterError};

/// Three comms, two of them failed by an injected registration error: the
/// struct counts the comms, the failed ones and the live windows, and
/// carries the simulator's violation count it was given.
#[test]
fn the_c_struct_counts_comms_failed_comms_and_live_windows() {
    let world = SimWorld::new(1);
    let al = Allocator::new(world.rank(0).unwrap());
    let ids: Vec<_> = (0..3)
        .map(|_| al.attach(world.comm_create(&[0]).unwrap()[0]).unwrap())
        .collect();
    al.alloc(2 << 20, 0).unwrap();
    al.alloc(2 << 20, 0).unwrap();
    assert_eq!(al.register(ids[0]).unwrap().windows, 2);
    for &id in &ids[1..] {
        // The second registration of each fails: one window stays.
        world.fail_nth(0, SimOp::Register, 2);
        assert!(matches!(
            al.register(id),
            Err(RegisterError::Register { .. })
        ));
    }
    let stats = al.stats();
    let states: Vec<_> = stats.comms.iter().map(|c| c.state).collect();
    assert_eq!(
        states,
        [CommState::Active, CommState::Failed, CommState::Failed]
    );
    let c = SegregStats::from_stats(&stats, 5);
    assert_eq!(
        (
            c.comms_attached,
            c.comms_failed,
            c.windows_live,
            c.sim_violations
        ),
        (3, 2, 4, 5)
    );
    al.free_all();
    for id in ids {
        al.detach(id).unwrap();
    }
    assert_eq!(world.stats().live_windows, 0);
}
