//! Allocation sites: the label an allocating thread sets, by which the
//! simulator names a buffer the same way on every rank.

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

thread_local! {
    static SITE: RefCell<Option<Arc<str>>> = const { RefCell::new(None) };
}

/// Labels the allocations the calling thread makes from now on (`None`
/// clears it). Ranks that run the same program label the same sites the
/// same way; the simulator then names each buffer by (site, number) and
/// reports ranks that register different buffers at the same position.
///
/// Once the thread's thread-locals are destroyed (at thread exit) it does
/// nothing, and the thread's allocations are unlabelled.
pub fn set_alloc_site(label: Option<&str>) {
    let label = label.map(Arc::from);
    let _ = SITE.try_with(|s| {
        if let Ok(mut site) = s.try_borrow_mut() {
            *site = label;
        }
    });
}

/// The calling thread's label; `None` also once its thread-locals are
/// destroyed (an allocation from a thread-exit handler is unlabelled
/// instead of a panic).
pub(super) fn current_site() -> Option<Arc<str>> {
    SITE.try_with(|s| s.try_borrow().ok().and_then(|site| site.clone()))
        .ok()
        .flatten()
}

/// The name of a simulated allocation that is the same on every rank that
/// runs the same program: its site label and its number among that site's
/// allocations on its rank (1, 2, …).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BufferId {
    /// The label set with [`set_alloc_site`] (`None`: unlabelled).
    pub site: Option<Arc<str>>,
    /// The allocation's number among the site's on its rank.
    pub index: u64,
}

impl fmt::Display for BufferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.site {
            Some(s) => write!(f, "{s}#{}", self.index),
            None => write!(f, "#{}", self.index),
        }
    }
}
