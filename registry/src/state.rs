//! The state word of a segment node: its phase, where it is linked, and who
//! holds it, packed in one `u64` so that every decision about the node is a
//! single compare-and-swap (DESIGN.md, "Node states").
//!
//! ```text
//!  63      56 55           32 31            8 7   5 4        3          2  0
//! +----------+---------------+---------------+-----+--------+----------+-----+
//! |  unused  | pins (24 bit) | holds (24 bit)|  0  |UNLINKED|IN_INDEX  |phase|
//! +----------+---------------+---------------+-----+--------+----------+-----+
//! ```

/// The lifecycle phase of a node (the low three bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub(crate) enum Phase {
    /// In the index, overlap not settled yet; invisible to every reader.
    Pending = 0,
    /// Overlap settled in its favour; being appended to the log.
    Accepted = 1,
    /// Tracked: visible to lookups, iteration and passes.
    Live = 2,
    /// Untracked.
    Dead = 3,
    /// Lost an overlap race; never reaches the log.
    Rejected = 4,
}

const PHASE_MASK: u64 = 0b111;
/// Set while the node is reachable from the address index.
pub(crate) const IN_INDEX: u64 = 1 << 3;
/// Set once the node has been unlinked from the log (final).
pub(crate) const UNLINKED: u64 = 1 << 4;
/// Set by untrack once it has withdrawn the node from the page map (U1a):
/// until then a slot may still name the node, so it must not be retired
/// (it may already be out of the index: a track at its address removes a
/// dead entry it meets).
pub(crate) const WITHDRAWN: u64 = 1 << 5;
/// One hold: a pass (or an untrack caller) that still needs the segment.
pub(crate) const HOLD_ONE: u64 = 1 << 8;
const HOLD_MASK: u64 = 0xff_ffff << 8;
/// One pin: a communicator watermark that points at this node.
pub(crate) const PIN_ONE: u64 = 1 << 32;
const PIN_MASK: u64 = 0xff_ffff << 32;

/// A decoded state word.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct State(pub(crate) u64);

impl State {
    /// A fresh node: pending, in the index (it is about to be inserted).
    pub(crate) const fn new_pending() -> Self {
        State(Phase::Pending as u64 | IN_INDEX)
    }

    /// The sentinel at the head of the log: live forever, never in the index.
    pub(crate) const fn sentinel() -> Self {
        State(Phase::Live as u64)
    }

    pub(crate) fn phase(self) -> Phase {
        match self.0 & PHASE_MASK {
            0 => Phase::Pending,
            1 => Phase::Accepted,
            2 => Phase::Live,
            3 => Phase::Dead,
            _ => Phase::Rejected,
        }
    }

    pub(crate) fn with_phase(self, p: Phase) -> Self {
        State((self.0 & !PHASE_MASK) | p as u64)
    }

    pub(crate) fn holds(self) -> u64 {
        (self.0 & HOLD_MASK) >> 8
    }

    pub(crate) fn pins(self) -> u64 {
        (self.0 & PIN_MASK) >> 32
    }

    pub(crate) fn has(self, bit: u64) -> bool {
        self.0 & bit != 0
    }

    /// Whether the segment counts as tracked for overlap purposes: its
    /// track won every overlap race it was in.
    pub(crate) fn is_committed(self) -> bool {
        matches!(self.phase(), Phase::Accepted | Phase::Live)
    }

    /// Whether the sweeper may unlink the node from the log: untracked,
    /// out of the page map and the index, held by no pass and pinned by no
    /// watermark.
    pub(crate) fn is_sweepable(self) -> bool {
        self.phase() == Phase::Dead
            && self.has(WITHDRAWN)
            && !self.has(IN_INDEX)
            && !self.has(UNLINKED)
            && self.holds() == 0
            && self.pins() == 0
    }
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "State({:?}{}{}{} holds={} pins={})",
            self.phase(),
            if self.has(IN_INDEX) { " in-index" } else { "" },
            if self.has(WITHDRAWN) {
                " withdrawn"
            } else {
                ""
            },
            if self.has(UNLINKED) { " unlinked" } else { "" },
            self.holds(),
            self.pins()
        )
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;

    #[test]
    fn fields_do_not_overlap() {
        let s = State(State::new_pending().with_phase(Phase::Dead).0 + 3 * HOLD_ONE + 2 * PIN_ONE);
        assert_eq!(s.phase(), Phase::Dead);
        assert_eq!(s.holds(), 3);
        assert_eq!(s.pins(), 2);
        assert!(s.has(IN_INDEX));
        assert!(!s.has(UNLINKED));
        assert!(!s.is_sweepable());
        let s = State((s.0 & !IN_INDEX) - 3 * HOLD_ONE - 2 * PIN_ONE);
        assert!(!s.is_sweepable(), "still in the page map");
        assert!(State(s.0 | WITHDRAWN).is_sweepable());
    }
}
