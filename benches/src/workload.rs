//! Realistic segment layouts and the random choices the benchmarks make.
//!
//! Segments look like `ncclMemAlloc`'s: 2 MiB-aligned, 2–64 MiB long (a
//! whole number of 2 MiB granules), laid out upward from a typical cuMem
//! virtual-address base with gaps of 0–3 granules between them.

use crate::maps::SegmentMap;

/// `ncclMemAlloc`'s granularity (cuMem VMM).
pub const GRANULE: usize = 2 << 20;

/// Where the layouts start: a typical cuMem reservation in a 48-bit space.
pub const VA_BASE: usize = 0x7f00_0000_0000;

/// A small, fast, seedable generator (SplitMix64): benchmark choices only.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform value in `0..n` (`n > 0`).
    #[inline]
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Shuffles `v` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// `count` disjoint segments in address order: `(addr, len)`.
pub fn layout(count: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut rng = Rng::new(seed);
    let mut addr = VA_BASE;
    (0..count)
        .map(|_| {
            let len = (1 + rng.below(32)) * GRANULE;
            let seg = (addr, len);
            addr += len + rng.below(4) * GRANULE;
            seg
        })
        .collect()
}

/// `count` addresses that each fall inside a random segment of `segs`
/// (at a random 256-byte-aligned offset), as a lookup of a tensor's data
/// pointer would.
pub fn probes(segs: &[(usize, usize)], count: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| {
            let (a, l) = segs[rng.below(segs.len())];
            a + rng.below(l / 256) * 256
        })
        .collect()
}

/// `count` byte ranges `(addr, size)` that each lie wholly inside a random
/// segment of `segs`: a random 256-byte-aligned start, as in [`probes`],
/// and a random whole number of 256-byte units up to what is left of the
/// segment, as a window lookup for a tensor would ask.
pub fn range_probes(segs: &[(usize, usize)], count: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| {
            let (a, l) = segs[rng.below(segs.len())];
            let addr = a + rng.below(l / 256) * 256;
            let left = a + l - addr;
            let size = (1 + rng.below(left / 256)) * 256;
            (addr, size)
        })
        .collect()
}

/// A population of segments of which `n` are live in a map and the rest
/// are spare, with the moves the single-thread benchmarks make between the
/// two sets.
pub struct Population {
    /// All slots, in address order.
    pub slots: Vec<(usize, usize)>,
    /// Indices of live slots, in no particular order.
    pub live: Vec<u32>,
    /// Indices of spare (untracked) slots.
    pub spare: Vec<u32>,
    /// The most recently tracked slots, oldest first.
    pub recent: Vec<u32>,
    /// The generator for every choice.
    pub rng: Rng,
}

impl Population {
    /// `n` live and `spare` spare slots; tracks the live ones into `m` in a
    /// random order (so seq order differs from address order).
    pub fn populate<M: SegmentMap>(m: &M, n: usize, spare: usize, seed: u64) -> Self {
        let slots = layout(n + spare, seed);
        let mut rng = Rng::new(seed.wrapping_add(1));
        let mut idx: Vec<u32> = (0..slots.len() as u32).collect();
        rng.shuffle(&mut idx);
        let spare = idx.split_off(n);
        for &i in &idx {
            let (a, l) = slots[i as usize];
            assert!(m.track(a, l), "{}: initial track refused", M::NAME);
        }
        Population {
            slots,
            live: idx,
            spare,
            recent: Vec::new(),
            rng,
        }
    }

    /// The live segments, as `(addr, len)`.
    pub fn live_segments(&self) -> Vec<(usize, usize)> {
        self.live.iter().map(|&i| self.slots[i as usize]).collect()
    }

    /// Moves `k` random live slots to the spare set and returns them (the
    /// caller untracks them).
    pub fn pick_live(&mut self, k: usize) -> Vec<(usize, usize)> {
        (0..k)
            .map(|_| {
                let j = self.rng.below(self.live.len());
                let i = self.live.swap_remove(j);
                self.spare.push(i);
                self.slots[i as usize]
            })
            .collect()
    }

    /// Moves `k` random spare slots to the live set and returns them (the
    /// caller tracks them).
    pub fn pick_spare(&mut self, k: usize) -> Vec<(usize, usize)> {
        (0..k)
            .map(|_| {
                let j = self.rng.below(self.spare.len());
                let i = self.spare.swap_remove(j);
                self.live.push(i);
                self.slots[i as usize]
            })
            .collect()
    }

    /// Untracks `k` random live slots from `m` (untimed housekeeping).
    pub fn untrack_random<M: SegmentMap>(&mut self, m: &M, k: usize) {
        for (a, _) in self.pick_live(k) {
            assert!(m.untrack(a), "{}: untrack of a live slot refused", M::NAME);
        }
    }

    /// Tracks `k` random spare slots into `m` (untimed housekeeping).
    pub fn track_random<M: SegmentMap>(&mut self, m: &M, k: usize) {
        for (a, l) in self.pick_spare(k) {
            assert!(m.track(a, l), "{}: track of a spare slot refused", M::NAME);
        }
    }

    /// Makes `k` segments pending for a comm whose watermark is at the tail:
    /// untracks the `k` most recently re-tracked slots (the first time, `k`
    /// random ones) and tracks them again, so they get new seqs. Choosing the
    /// most recent ones keeps this setup cheap for the Vec baseline (its
    /// entries sit at the end of the vector) without changing what the pass
    /// then does.
    pub fn make_pending<M: SegmentMap>(&mut self, m: &M, k: usize) {
        if self.recent.len() != k {
            let mut pick = self.live.clone();
            self.rng.shuffle(&mut pick);
            pick.truncate(k);
            self.recent = pick;
        }
        for &i in self.recent.iter().rev() {
            assert!(m.untrack(self.slots[i as usize].0), "{}", M::NAME);
        }
        for &i in &self.recent {
            let (a, l) = self.slots[i as usize];
            assert!(m.track(a, l), "{}", M::NAME);
        }
    }
}

/// Machine-readable facts about the machine and the run, for the reports.
pub mod machine {
    use crate::results::Machine;

    /// Describes this machine (cores, CPU model, OS) and today's UTC date.
    pub fn describe() -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu,
            os: std::env::consts::OS.into(),
            date: crate::results::utc_date_now(),
            registry_rev: crate::results::REGISTRY_REV.into(),
        }
    }
}
