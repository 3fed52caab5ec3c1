//! The sim device's page table (dmirror's xarray): address → entry, in
//! leaves of 512 entries (2 MiB of addresses), and device page → address.

use std::collections::BTreeMap;
use std::ops::Range;

use uhmm::{DevicePfn, PAGE_SIZE, SystemPage};

/// Entries in one leaf.
const LEAF: usize = 512;

/// A device page-table entry.
#[derive(Debug, Clone)]
pub(crate) enum Pte {
    /// A RAM page the device reaches through the address.
    System { writable: bool },
    /// One of this device's pages.
    Device(DevicePfn),
    /// A RAM page held for this device's exclusive access (dmirror's
    /// atomic tag), reached through the holding page.
    Atomic(SystemPage),
    /// One of this device's coherent pages: mapped in the region, reached
    /// through its address.
    Coherent(DevicePfn),
}

impl Pte {
    fn pfn(&self) -> Option<DevicePfn> {
        match self {
            Pte::Device(pfn) | Pte::Coherent(pfn) => Some(*pfn),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Leaf {
    ptes: Box<[Option<Pte>]>,
    used: usize,
}

/// The device page table.
#[derive(Debug, Default)]
pub(crate) struct Table {
    /// Leaves by address / (LEAF pages).
    leaves: BTreeMap<usize, Leaf>,
    /// The address each device page is mapped at (0: none; no region page
    /// is at address 0).
    by_pfn: Vec<usize>,
}

fn split(addr: usize) -> (usize, usize) {
    let page = addr / PAGE_SIZE;
    (page / LEAF, page % LEAF)
}

impl Table {
    pub(crate) fn get(&self, addr: usize) -> Option<&Pte> {
        let (leaf, i) = split(addr);
        self.leaves.get(&leaf)?.ptes[i].as_ref()
    }

    pub(crate) fn insert(&mut self, addr: usize, pte: Pte) {
        self.insert_many([(addr, pte)]);
    }

    /// Inserts entries (best in address order: one leaf lookup for each
    /// run of entries in one leaf), replacing what was there.
    pub(crate) fn insert_many(&mut self, entries: impl IntoIterator<Item = (usize, Pte)>) {
        let mut entries = entries.into_iter().peekable();
        while let Some(&(first, _)) = entries.peek() {
            let key = split(first).0;
            let leaf = self.leaves.entry(key).or_insert_with(|| Leaf { ptes: vec![None; LEAF].into(), used: 0 });
            while let Some((addr, pte)) = entries.next_if(|(a, _)| split(*a).0 == key) {
                let pfn = pte.pfn();
                match leaf.ptes[split(addr).1].replace(pte) {
                    None => leaf.used += 1,
                    // Its device page no longer backs this address.
                    Some(old) => {
                        if let Some(slot) = old.pfn().and_then(|pfn| self.by_pfn.get_mut(pfn.0 as usize)) {
                            *slot = 0;
                        }
                    }
                }
                if let Some(pfn) = pfn {
                    let p = pfn.0 as usize;
                    if p >= self.by_pfn.len() {
                        self.by_pfn.resize((p + 1).next_power_of_two(), 0);
                    }
                    self.by_pfn[p] = addr;
                }
            }
        }
    }

    pub(crate) fn remove_addr(&mut self, addr: usize) {
        let (key, i) = split(addr);
        let Some(leaf) = self.leaves.get_mut(&key) else { return };
        let Some(pte) = leaf.ptes[i].take() else { return };
        leaf.used -= 1;
        if leaf.used == 0 {
            self.leaves.remove(&key);
        }
        if let Some(slot) = pte.pfn().and_then(|pfn| self.by_pfn.get_mut(pfn.0 as usize)) {
            *slot = 0;
        }
    }

    pub(crate) fn remove_pfn(&mut self, pfn: DevicePfn) {
        if let Some(&addr) = self.by_pfn.get(pfn.0 as usize).filter(|a| **a != 0) {
            self.remove_addr(addr);
        }
    }

    /// The entries of `range`, in address order.
    pub(crate) fn range(&self, range: Range<usize>) -> impl Iterator<Item = (usize, &Pte)> {
        let (first, last) = (split(range.start).0, split(range.end.saturating_sub(1)).0);
        let keys = if range.is_empty() { first..first } else { first..last + 1 };
        let (first_page, end_page) = (range.start.div_ceil(PAGE_SIZE), range.end.div_ceil(PAGE_SIZE));
        self.leaves.range(keys).flat_map(move |(key, leaf)| {
            // Only the slots of this leaf inside the range.
            let base = key * LEAF;
            let slots = first_page.saturating_sub(base).min(LEAF)..end_page.saturating_sub(base).min(LEAF);
            leaf.ptes[slots.clone()]
                .iter()
                .zip(slots)
                .filter_map(move |(pte, i)| pte.as_ref().map(|p| ((base + i) * PAGE_SIZE, p)))
        })
    }

    /// Drops the entries of `range` (keeping device pages when `keep_device`).
    pub(crate) fn remove_range(&mut self, range: Range<usize>, keep_device: bool) {
        let doomed: Vec<usize> = self
            .range(range)
            // Coherent pages are reached by address: they go like RAM pages.
            .filter(|(_, pte)| !(keep_device && matches!(pte, Pte::Device(_))))
            .map(|(a, _)| a)
            .collect();
        for a in doomed {
            self.remove_addr(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_by_address_and_by_page() {
        let mut t = Table::default();
        let base = 0x7f00_0000_0000;
        let at = |p: usize| base + p * PAGE_SIZE;
        t.insert(at(511), Pte::Device(DevicePfn(7)));
        t.insert(at(512), Pte::System { writable: true });
        t.insert(at(2000), Pte::Coherent(DevicePfn(3)));
        assert!(matches!(t.get(at(511)), Some(Pte::Device(DevicePfn(7)))));
        assert!(t.get(at(510)).is_none());
        let all: Vec<usize> = t.range(at(0)..at(4096)).map(|(a, _)| a).collect();
        assert_eq!(all, [at(511), at(512), at(2000)]);
        assert_eq!(t.range(at(512)..at(2000)).count(), 1, "end excluded");
        let one: Vec<usize> = t.range(at(511)..at(512)).map(|(a, _)| a).collect();
        assert_eq!(one, [at(511)], "one page at the end of a leaf");
        let mid: Vec<usize> = t.range(at(511) + 1..at(512) + 1).map(|(a, _)| a).collect();
        assert_eq!(mid, [at(512)], "a page before the start is excluded, one containing the end included");
        // Remapping an address drops its old device page's reverse entry.
        t.insert(at(511), Pte::System { writable: false });
        t.remove_pfn(DevicePfn(7));
        assert!(matches!(t.get(at(511)), Some(Pte::System { writable: false })));
        t.remove_pfn(DevicePfn(3));
        assert!(t.get(at(2000)).is_none());
        t.insert(at(5), Pte::Device(DevicePfn(1)));
        t.insert(at(5), Pte::Device(DevicePfn(1)));
        t.remove_pfn(DevicePfn(1));
        assert!(t.get(at(5)).is_none(), "re-inserting a page keeps its reverse entry");
        t.insert(at(5), Pte::Device(DevicePfn(1)));
        t.remove_range(at(0)..at(600), true);
        assert!(t.get(at(5)).is_some(), "device pages kept");
        assert!(t.get(at(511)).is_none() && t.get(at(512)).is_none());
        t.remove_range(at(0)..at(600), false);
        assert_eq!(t.range(0..usize::MAX).count(), 0);
        assert!(t.leaves.is_empty(), "empty leaves are dropped");
    }
}
