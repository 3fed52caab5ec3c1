//! The residency map: one character per cell of pages, from
//! [`uhmm::AddressSpace::snapshot`].

use std::fmt::Write as _;

use uhmm::{PAGE_SIZE, PageSnapshot, Residency};

use crate::units::human;

/// The legend printed once above the maps.
pub const LEGEND: &str = "'.' hole  'R' RAM/zero page  'D' on a device  '!' poisoned (any page)  'm' mixed";

/// How pages are grouped into cells and cells into rows.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Pages per character.
    pub pages_per_cell: usize,
    /// Characters per row.
    pub width: usize,
}

impl Layout {
    /// A layout for `npages` pages, `width` characters a row and at most
    /// `max_rows` rows.
    pub fn new(npages: usize, width: usize, max_rows: usize) -> Layout {
        let width = width.max(1);
        let cells = (width * max_rows.max(1)).min(npages.max(1));
        Layout { pages_per_cell: npages.max(1).div_ceil(cells), width }
    }

    /// The line describing a cell.
    pub fn describe(&self) -> String {
        format!("1 char = {} page(s) = {}", self.pages_per_cell, human(self.pages_per_cell * PAGE_SIZE))
    }
}

fn class(r: &Residency) -> u8 {
    match r {
        Residency::None => b'.',
        Residency::Zero | Residency::Ram | Residency::Exclusive => b'R',
        Residency::Device(..) | Residency::Coherent(..) => b'D',
        Residency::Poisoned => b'!',
        Residency::Unmapped => b' ',
    }
}

/// Page counts by residency.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Census {
    /// Holes.
    pub hole: usize,
    /// RAM pages.
    pub ram: usize,
    /// Shared zero pages.
    pub zero: usize,
    /// Pages on a device.
    pub device: usize,
    /// Poisoned pages.
    pub poisoned: usize,
    /// Pages no region maps.
    pub unmapped: usize,
}

impl Census {
    /// Counts `pages`.
    pub fn of(pages: &[PageSnapshot]) -> Census {
        let mut c = Census::default();
        for p in pages {
            match p.residency {
                Residency::None => c.hole += 1,
                Residency::Zero => c.zero += 1,
                Residency::Ram | Residency::Exclusive => c.ram += 1,
                Residency::Device(..) | Residency::Coherent(..) => c.device += 1,
                Residency::Poisoned => c.poisoned += 1,
                Residency::Unmapped => c.unmapped += 1,
            }
        }
        c
    }
}

impl std::fmt::Display for Census {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pages: hole {}  ram {}  zero {}  device {}  poisoned {}",
            self.hole, self.ram, self.zero, self.device, self.poisoned
        )?;
        if self.unmapped > 0 {
            write!(f, "  unmapped {}", self.unmapped)?;
        }
        Ok(())
    }
}

/// Renders the map of `pages`, each row indented by `indent`.
pub fn render(pages: &[PageSnapshot], layout: Layout, indent: &str) -> String {
    let mut out = String::new();
    let cells: Vec<u8> = pages
        .chunks(layout.pages_per_cell)
        .map(|cell| {
            let mut it = cell.iter().map(|p| class(&p.residency));
            let first = it.next().unwrap_or(b' ');
            let mut c = first;
            for k in it {
                if k == b'!' {
                    return b'!';
                }
                if k != first {
                    c = b'm';
                }
            }
            c
        })
        .collect();
    for row in cells.chunks(layout.width) {
        let _ = writeln!(out, "{indent}|{}|", String::from_utf8_lossy(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use uhmm::Prot;

    fn snap(r: Residency) -> PageSnapshot {
        PageSnapshot { residency: r, prot: Prot::READ_WRITE, huge: false }
    }

    #[test]
    fn layout_fits() {
        let l = Layout::new(65536, 64, 4);
        assert_eq!(l.pages_per_cell, 256);
        let l = Layout::new(10, 64, 4);
        assert_eq!(l.pages_per_cell, 1);
        let l = Layout::new(1000, 64, 4);
        assert!(l.pages_per_cell * 256 >= 1000);
    }

    #[test]
    fn cells() {
        let mut pages = vec![snap(Residency::None); 4];
        pages.extend([snap(Residency::Ram), snap(Residency::Zero), snap(Residency::Ram), snap(Residency::Ram)]);
        pages.extend([snap(Residency::Ram), snap(Residency::None), snap(Residency::None), snap(Residency::None)]);
        pages.extend([snap(Residency::Ram), snap(Residency::Poisoned), snap(Residency::None), snap(Residency::None)]);
        let out = render(&pages, Layout { pages_per_cell: 4, width: 64 }, "");
        assert_eq!(out, "|.Rm!|\n");
        let c = Census::of(&pages);
        assert_eq!((c.hole, c.ram, c.zero, c.poisoned), (9, 5, 1, 1));
    }
}
