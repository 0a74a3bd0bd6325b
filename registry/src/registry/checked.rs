//! Checked passes: before it registers anything, a pass hands a digest of
//! its fixed set to an agreement among the ranks, and registers only if
//! every rank's digest is the same (DESIGN.md, "checked pass").

use super::pass::{take_busy, PassRun};
use super::Registry;
use crate::agreement::{Digest, DigestRange};
use crate::error::{Divergence, PassError};
use crate::index::AddressIndex;
use crate::results::{PassFailure, PassReport, PassResult};
use crate::{CommId, Segment};

impl<C, W, I: AddressIndex> Registry<C, W, I> {
    /// A checked registration pass: fixes its set as
    /// [`register_pending`](Self::register_pending) does, then calls
    /// `agree(payload, &digest)` once, before any `register`, and registers
    /// only if the returned [`DigestRange`] [agrees](DigestRange::agrees).
    ///
    /// `agree` is the caller's collective: it exchanges the digest with
    /// every rank of the comm (for NCCL, an all-reduce with max of
    /// [`Digest::reduction_input`] on a private comm) and returns the
    /// group's range. It is called with no lock held, also when nothing is
    /// pending (then `digest.segments == 0`), so that every rank reaches
    /// it at every checked pass.
    ///
    /// * The ranks disagree, or one abstained ([`abstain_checked`]):
    ///   [`PassError::Diverged`]. Nothing is registered, the segments stay
    ///   pending, and the comm's checked-pass count becomes the group's
    ///   maximum (the only change), so a rank that skipped a pass costs
    ///   one `Diverged`, not every later pass.
    /// * `agree` fails: [`PassError::Agreement`], nothing registered.
    /// * The comm is not attached, or a pass already runs for it: the
    ///   usual [`PassError::Comm`] at once, without calling `agree` (the
    ///   peers then wait in their agreement until its deadline).
    ///
    /// [`abstain_checked`]: Self::abstain_checked
    ///
    /// ```
    /// # #[cfg(not(feature = "loom"))] {
    /// use segment_registry::{DigestRange, PassError, Registry};
    ///
    /// let reg: Registry<(), u64> = Registry::new();
    /// let comm = reg.attach(());
    /// reg.track(0x20_0000, 0x20_0000).unwrap();
    /// // A group of one: the agreement is the rank's own digest.
    /// let report = reg
    ///     .register_pending_checked(comm, |_, d| Ok::<_, ()>(DigestRange::of_one(*d)), |_, s| {
    ///         Ok(Some(s.seq))
    ///     })
    ///     .unwrap();
    /// assert_eq!(report.registered.len(), 1);
    ///
    /// // A peer that has one more segment pending: nothing is registered.
    /// reg.track(0x60_0000, 0x20_0000).unwrap();
    /// let failure = reg
    ///     .register_pending_checked(
    ///         comm,
    ///         |_, d| {
    ///             let peer = segment_registry::Digest { segments: d.segments + 1, ..*d };
    ///             Ok::<_, ()>(DigestRange { min: *d, max: peer })
    ///         },
    ///         |_, s| Ok(Some(s.seq)),
    ///     )
    ///     .unwrap_err();
    /// assert!(matches!(failure.error, PassError::Diverged(_)));
    /// assert_eq!(reg.pending(comm), Ok(1));
    /// # }
    /// ```
    pub fn register_pending_checked<E, A, F>(
        &self,
        comm: CommId,
        agree: A,
        register: F,
    ) -> PassResult<'_, W, E>
    where
        A: FnOnce(&C, &Digest) -> Result<DigestRange, E>,
        F: FnMut(&C, &Segment) -> Result<Option<W>, E>,
    {
        self.checked(comm, false, agree)?.run(register)
    }

    /// Takes part in a checked pass without registering (the digest's
    /// `abstain` is 1), for a rank that cannot or will not register now
    /// (its comm failed, or its caller's region raised): every rank's pass
    /// then ends with [`PassError::Diverged`] instead of waiting for this
    /// one. Returns that failure (or `Agreement`, or a local `Comm` error
    /// as [`register_pending_checked`](Self::register_pending_checked)
    /// does), whose report must be acted on like any pass's: it hands back
    /// what an earlier panicking pass on the comm parked.
    pub fn abstain_checked<E, A>(&self, comm: CommId, agree: A) -> PassFailure<'_, W, E>
    where
        A: FnOnce(&C, &Digest) -> Result<DigestRange, E>,
    {
        match self.checked(comm, true, agree) {
            Err(f) => f,
            // `checked` lets an abstaining pass go on in no case.
            Ok(_) => unreachable!("an abstaining pass never registers"),
        }
    }

    /// P0–P3, then the agreement: a pass that may register, or why not.
    fn checked<E, A>(
        &self,
        comm: CommId,
        abstain: bool,
        agree: A,
    ) -> Result<PassRun<'_, C, W, I>, PassFailure<'_, W, E>>
    where
        A: FnOnce(&C, &Digest) -> Result<DigestRange, E>,
    {
        let fail = |error| PassFailure {
            error,
            report: PassReport::new(comm),
        };
        // The comm table's read lock is dropped before the agreement.
        let slot = {
            let comms = self.comms.read().unwrap();
            take_busy(&comms, comm)
                .map_err(|e| fail(PassError::Comm(e)))?
                .clone()
        };
        let mut run = PassRun::start(self, slot);
        let local = run.digest(run.checked_passes() + 1, abstain);
        let group = match agree(run.payload(), &local) {
            Ok(group) => group,
            Err(error) => return Err(run.stop(PassError::Agreement { comm, error })),
        };
        run.set_checked_passes(group.max.passes.max(local.passes));
        if group.agrees() && !abstain {
            Ok(run)
        } else {
            Err(run.stop(PassError::Diverged(Box::new(Divergence {
                comm,
                local,
                group,
            }))))
        }
    }
}
