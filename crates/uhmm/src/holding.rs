//! The holding area: where pages made exclusive to a device wait, a page
//! at a time, in a registered staging arena (`make_device_exclusive`'s
//! device-exclusive entries; see `exclusive`).

use std::sync::{Arc, Mutex};

use uhmm_sys::PAGE_SIZE;

use crate::Result;
use crate::staging::{Arena, Slots, SystemPage};

/// The holding area: pages of a registered arena handed out one at a time.
#[derive(Debug)]
pub(crate) struct Holding {
    arena: Arc<Arena>,
    /// Batches taken from the arena, and the free page offsets in them.
    slots: Mutex<(Vec<Slots>, Vec<usize>)>,
}

impl Holding {
    pub(crate) fn new(arena: Arc<Arena>) -> Holding {
        Holding { arena, slots: Mutex::new((Vec::new(), Vec::new())) }
    }

    pub(crate) fn take(&self) -> Result<usize> {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if s.1.is_empty() {
            let batch = self.arena.alloc(crate::BATCH_PAGES)?;
            s.1.extend((0..crate::BATCH_PAGES).rev().map(|i| batch.offset(i)));
            s.0.push(batch);
        }
        Ok(s.1.pop().expect("just refilled"))
    }

    /// Gives page `off` back, emptied.
    pub(crate) fn give_back(&self, off: usize) {
        if let Err(err) = self.arena.map.discard(off, PAGE_SIZE) {
            tracing::error!(%err, "discarding a holding page failed; leaking it");
            return;
        }
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).1.push(off);
    }

    pub(crate) fn map(&self) -> &uhmm_sys::mman::Mapping {
        &self.arena.map
    }

    pub(crate) fn page(&self, off: usize) -> SystemPage {
        SystemPage::new(&self.arena, off)
    }

    pub(crate) fn addr(&self, off: usize) -> usize {
        self.arena.map.addr() + off
    }
}
