//! What ranks compare before a checked pass registers anything: a digest of
//! the set each rank's pass fixed, and the group's range of it (DESIGN.md,
//! "checked pass").
//!
//! A registration is collective, so ranks that would register different
//! sets hang (or end up with inconsistent windows). A checked pass hands its
//! digest to a caller-supplied agreement, one small all-reduce among the
//! ranks, and registers only if every rank's digest is the same.
//!
//! ```
//! # #[cfg(not(feature = "loom"))] {
//! use segment_registry::{Digest, DigestRange};
//!
//! let a = Digest { passes: 1, segments: 3, bytes: 6 << 20, ..Digest::default() };
//! let b = Digest { segments: 2, bytes: 4 << 20, ..a };
//! // What an all-reduce with max over every rank's reduction_input gives:
//! let mut reduced = a.reduction_input();
//! for (r, v) in reduced.iter_mut().zip(b.reduction_input()) {
//!     *r = (*r).max(v);
//! }
//! let group = Digest::range_from_reduced(reduced);
//! assert_eq!((group.min.segments, group.max.segments), (2, 3));
//! assert!(!group.agrees());
//! assert!(DigestRange::of_one(a).agrees());
//! # }
//! ```

use crate::Segment;

/// What a checked pass tells its peers about the set it fixed. Every field
/// is a `u64`, so that one all-reduce of [`reduction_input`]
/// (`ncclUint64`, `ncclMax`) carries the group's minimum and maximum of
/// each.
///
/// What it cannot see: ranks whose sets differ but agree in every field,
/// e.g. two ranks each with one different segment of the same size. Such
/// sets register as a collective of matching sizes, which NCCL accepts.
///
/// [`reduction_input`]: Digest::reduction_input
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Digest {
    /// 1 if this rank takes part without registering (it failed, or its
    /// caller chose to skip): every rank then gets `Diverged`.
    pub abstain: u64,
    /// This comm's checked-pass number on this rank (1 for the first). A
    /// rank that skipped a pass and calls the next one differs here; after
    /// the agreement every rank adopts the group's maximum.
    pub passes: u64,
    /// Segments in the set.
    pub segments: u64,
    /// Bytes in the set (wrapping).
    pub bytes: u64,
    /// A hash of the segments' lengths in seq order (FNV-1a).
    pub lengths_hash: u64,
}

/// The group's range of each [`Digest`] field, from one agreement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DigestRange {
    /// The smallest value of each field among the ranks.
    pub min: Digest,
    /// The largest value of each field among the ranks.
    pub max: Digest,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Digest {
    /// Number of `u64` words in a digest.
    pub const WORDS: usize = 5;

    /// The digest of a set, in seq order, for checked pass number `passes`.
    pub fn of_set<'a>(passes: u64, set: impl IntoIterator<Item = &'a Segment>) -> Self {
        let mut d = Digest {
            passes,
            lengths_hash: FNV_OFFSET,
            ..Digest::default()
        };
        for s in set {
            d.segments += 1;
            d.bytes = d.bytes.wrapping_add(s.len as u64);
            for byte in (s.len as u64).to_le_bytes() {
                d.lengths_hash = (d.lengths_hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
            }
        }
        d
    }

    /// The fields as words, in declaration order.
    pub fn to_words(&self) -> [u64; Self::WORDS] {
        [
            self.abstain,
            self.passes,
            self.segments,
            self.bytes,
            self.lengths_hash,
        ]
    }

    /// A digest from [`to_words`](Self::to_words)'s order.
    pub fn from_words(w: [u64; Self::WORDS]) -> Self {
        Digest {
            abstain: w[0],
            passes: w[1],
            segments: w[2],
            bytes: w[3],
            lengths_hash: w[4],
        }
    }

    /// The words to all-reduce with max: each field, then its complement
    /// (`max(!v) = !min(v)`, so one reduction gives both extremes).
    pub fn reduction_input(&self) -> [u64; 2 * Self::WORDS] {
        let w = self.to_words();
        let mut out = [0; 2 * Self::WORDS];
        for (i, v) in w.into_iter().enumerate() {
            out[i] = v;
            out[Self::WORDS + i] = !v;
        }
        out
    }

    /// The group's range from the max-reduced
    /// [`reduction_input`](Self::reduction_input) of every rank.
    pub fn range_from_reduced(r: [u64; 2 * Self::WORDS]) -> DigestRange {
        let mut max = [0; Self::WORDS];
        let mut min = [0; Self::WORDS];
        for i in 0..Self::WORDS {
            max[i] = r[i];
            min[i] = !r[Self::WORDS + i];
        }
        DigestRange {
            min: Digest::from_words(min),
            max: Digest::from_words(max),
        }
    }

    /// The digest without `bytes` and `lengths_hash`: for NCCL 2.30 and
    /// later, which accept different sizes per rank in one registration.
    pub fn without_sizes(self) -> Self {
        Digest {
            bytes: 0,
            lengths_hash: 0,
            ..self
        }
    }
}

impl DigestRange {
    /// The range of a group of one rank.
    pub fn of_one(d: Digest) -> Self {
        DigestRange { min: d, max: d }
    }

    /// Whether the pass may register: every rank has the same digest and
    /// none abstains.
    pub fn agrees(&self) -> bool {
        self.min == self.max && self.max.abstain == 0
    }
}

impl std::fmt::Display for DigestRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (lo, hi) = (&self.min, &self.max);
        write!(
            f,
            "{} to {} segments ({} to {} bytes), checked pass {} to {}",
            lo.segments, hi.segments, lo.bytes, hi.bytes, lo.passes, hi.passes
        )?;
        if hi.abstain != 0 {
            f.write_str(", a rank abstained")?;
        }
        Ok(())
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;

    fn seg(len: usize, seq: u64) -> Segment {
        Segment {
            addr: 0x1000 * seq as usize,
            len,
            seq,
        }
    }

    /// FNV-1a, written out from its definition, over the lengths' bytes.
    fn fnv1a(lens: &[u64]) -> u64 {
        let mut h: u64 = 14_695_981_039_346_656_037;
        for l in lens {
            for b in l.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(1_099_511_628_211);
            }
        }
        h
    }

    #[test]
    fn the_lengths_hash_is_fnv1a_and_sees_order_and_sizes() {
        let (a, b, c) = (seg(2 << 20, 1), seg(4 << 20, 2), seg(3 << 20, 3));
        let ab = Digest::of_set(1, &[a, b]);
        assert_eq!(ab.lengths_hash, fnv1a(&[2 << 20, 4 << 20]));
        assert_eq!(Digest::of_set(1, &[]).lengths_hash, fnv1a(&[]));
        // Same count and bytes, other order or other split: another hash.
        let ba = Digest::of_set(1, &[b, a]);
        let cc = Digest::of_set(1, &[c, c]);
        assert_eq!((ab.segments, ab.bytes), (ba.segments, ba.bytes));
        assert_eq!((ab.segments, ab.bytes), (cc.segments, cc.bytes));
        assert_ne!(ab.lengths_hash, ba.lengths_hash);
        assert_ne!(ab.lengths_hash, cc.lengths_hash);
        assert_eq!((ab.passes, ab.abstain), (1, 0));
    }

    #[test]
    fn one_max_reduction_gives_both_extremes_of_every_field() {
        let ds = [
            Digest {
                abstain: 0,
                passes: 4,
                segments: 7,
                bytes: u64::MAX,
                lengths_hash: 3,
            },
            Digest {
                abstain: 1,
                passes: 2,
                segments: 9,
                bytes: 0,
                lengths_hash: u64::MAX - 1,
            },
            Digest {
                abstain: 0,
                passes: 3,
                segments: 8,
                bytes: 5,
                lengths_hash: 0,
            },
        ];
        let mut r = [0u64; 2 * Digest::WORDS];
        for d in &ds {
            for (x, y) in r.iter_mut().zip(d.reduction_input()) {
                *x = (*x).max(y);
            }
        }
        let range = Digest::range_from_reduced(r);
        for i in 0..Digest::WORDS {
            let col = ds.iter().map(|d| d.to_words()[i]);
            assert_eq!(
                range.min.to_words()[i],
                col.clone().min().unwrap(),
                "min of field {i}"
            );
            assert_eq!(
                range.max.to_words()[i],
                col.max().unwrap(),
                "max of field {i}"
            );
        }
        for d in &ds {
            assert_eq!(Digest::from_words(d.to_words()), *d);
            assert_eq!(
                Digest::range_from_reduced(d.reduction_input()),
                DigestRange::of_one(*d)
            );
        }
        assert!(!range.agrees());
    }

    #[test]
    fn a_range_agrees_only_on_one_value_without_abstention() {
        let d = Digest::of_set(2, &[seg(1 << 20, 1)]);
        assert!(DigestRange::of_one(d).agrees());
        assert!(!DigestRange::of_one(Digest { abstain: 1, ..d }).agrees());
        assert!(!DigestRange {
            min: d,
            max: Digest { segments: 2, ..d }
        }
        .agrees());
        assert!(!DigestRange {
            min: Digest { passes: 1, ..d },
            max: d
        }
        .agrees());
        let s = d.without_sizes();
        assert_eq!(
            (s.bytes, s.lengths_hash, s.segments, s.passes),
            (0, 0, 1, 2)
        );
    }

    #[test]
    fn the_range_says_what_differs() {
        let d = Digest::of_set(1, &[seg(1 << 20, 1)]);
        let text = DigestRange {
            min: d,
            max: Digest {
                segments: 3,
                abstain: 1,
                ..d
            },
        }
        .to_string();
        assert_eq!(
            text,
            "1 to 3 segments (1048576 to 1048576 bytes), checked pass 1 to 1, a rank abstained"
        );
        assert!(!DigestRange::of_one(d).to_string().contains("abstained"));
    }
}
