//! Unmaps and moves of region memory that uhmm makes itself, announced so
//! that the handlers take their non-cooperative events for uhmm's own.

use std::ops::Range;
use std::sync::Mutex;

/// Address ranges uhmm itself is unmapping or moving at the moment: the
/// events they send are its own.
///
/// The kernel lets the calling thread return as soon as a handler has read
/// the event, which may be before the handler looked at it. So handlers
/// read and look at events holding [`OwnChanges::order`], and an
/// announcement is withdrawn under it too: by then every event its call
/// sent was looked at. The lock also keeps events in the order the kernel
/// sent them across handler threads (an `mremap` sends its move, then the
/// unmap of the old range).
#[derive(Debug, Default)]
pub(crate) struct OwnChanges {
    ranges: Mutex<Vec<Range<usize>>>,
    order: Mutex<()>,
}

/// An announced change, withdrawn on drop (see [`OwnChanges`]). A thread
/// must not hold a lock the handlers take (the regions' table) when it
/// drops one.
pub(crate) struct OwnChange<'a> {
    list: &'a OwnChanges,
    range: Range<usize>,
}

impl OwnChanges {
    /// Announces that uhmm changes `range` now.
    pub(crate) fn announce(&self, range: Range<usize>) -> OwnChange<'_> {
        self.ranges.lock().unwrap_or_else(|e| e.into_inner()).push(range.clone());
        OwnChange { list: self, range }
    }

    /// Held by a handler from before it reads events until it has looked
    /// at the non-cooperative ones among them.
    pub(crate) fn order(&self) -> std::sync::MutexGuard<'_, ()> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every event read so far was looked at: a change the
    /// program made before calling uhmm is known before uhmm unmaps or
    /// protects anything for it. (Uncontended where no handler reads
    /// such events.)
    pub(crate) fn settle(&self) {
        drop(self.order());
    }

    pub(crate) fn covers(&self, range: &Range<usize>) -> bool {
        let own = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        own.iter().any(|o| o.start <= range.start && range.end <= o.end)
    }
}

impl Drop for OwnChange<'_> {
    fn drop(&mut self) {
        let _looked = self.list.order();
        let mut own = self.list.ranges.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = own.iter().position(|r| *r == self.range) {
            own.swap_remove(i);
        }
    }
}
