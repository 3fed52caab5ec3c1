//! The compressed store's pool: objects packed by size class, zsmalloc's
//! idea in user space.
//!
//! Each size class is one large mapping (address space reserved up to the
//! pool's capacity; RAM used only where objects are), cut into slots of the
//! class's size laid end to end, so that an object may straddle two pieces
//! of memory as zsmalloc's objects straddle the pages of a zspage. Memory is
//! counted in pieces of [`PIECE_BYTES`]: a piece is in use while a live slot
//! touches it. A piece the last slot leaves stays resident, empty, until
//! [`Pool::release_empty`] gives the RAM of the empty pieces back
//! (`MADV_DONTNEED`, one call per run of them): each call flushes TLBs on
//! every CPU the process runs on, which a fault freeing its page must not
//! wait for. A new object takes the lowest free slot of its class, so live
//! objects gather at the front (and reuse empty pieces first);
//! [`Pool::compact`] moves the objects of the highest slots into the lowest
//! holes, then releases the empty pieces.

use std::collections::BTreeSet;

use uhmm::{Mapping, PAGE_SIZE, Protection};

/// The unit in which the pool takes and gives back RAM: a page, as
/// zsmalloc's (a class's partly used last piece is all it wastes, so a
/// larger piece would cost up to a piece per class).
pub(crate) const PIECE_BYTES: usize = PAGE_SIZE;

/// The largest object the pool holds.
pub(crate) const MAX_OBJECT: usize = 64 << 10;

/// Classes of 32-byte steps up to a page, then 512-byte steps up to
/// [`MAX_OBJECT`]: at most 31 (or 511) bytes lost to rounding an object.
const SMALL_STEP: usize = 32;
const LARGE_STEP: usize = 512;
const SMALL_CLASSES: usize = PAGE_SIZE / SMALL_STEP;
const CLASSES: usize = SMALL_CLASSES + (MAX_OBJECT - PAGE_SIZE) / LARGE_STEP;

/// Where an object lives: its class and slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Handle {
    class: u16,
    slot: u32,
}

impl Handle {
    /// No object (a placeholder until one is stored).
    pub(crate) const NONE: Handle = Handle { class: u16::MAX, slot: u32::MAX };
}

/// What the pool holds, for the store's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PoolUsage {
    /// RAM the pool uses: pieces in use, and empty ones not given back yet.
    pub(crate) used_bytes: usize,
    /// Bytes of the live objects themselves.
    pub(crate) object_bytes: usize,
    /// Bytes of the slots they take (object bytes plus class rounding).
    pub(crate) slot_bytes: usize,
    /// Live objects.
    pub(crate) objects: usize,
    /// RAM of pieces no live object touches, not given back yet.
    pub(crate) empty_bytes: usize,
}

/// A size class: slots of `size` bytes in one mapping.
#[derive(Debug)]
struct Class {
    size: usize,
    /// Created on first use.
    map: Option<Mapping>,
    /// Free slots below `high`.
    free: BTreeSet<u32>,
    /// Slots ever handed out and not trimmed: every slot at or above is free.
    high: u32,
    /// Live slots touching each piece, for the pieces below `high`'s end.
    live_in_piece: Vec<u16>,
    /// The owner of each slot below `high` (for compaction).
    owners: Vec<u32>,
    /// Pieces no live slot touches that still hold RAM.
    empty: BTreeSet<usize>,
    objects: usize,
    object_bytes: usize,
}

/// Objects packed by size class (see the module docs).
#[derive(Debug)]
pub(crate) struct Pool {
    classes: Vec<Class>,
    /// Bytes each class reserves: the capacity, and room for one object.
    reserve: usize,
    capacity_pieces: usize,
    /// Pieces a live slot touches.
    used_pieces: usize,
    /// Empty pieces still resident (see the module docs).
    empty_pieces: usize,
}

impl Pool {
    /// A pool that uses at most `capacity` bytes of RAM (rounded up to whole
    /// pieces).
    pub(crate) fn new(capacity: usize) -> Pool {
        let capacity_pieces = capacity.div_ceil(PIECE_BYTES).max(1);
        let classes = (0..CLASSES)
            .map(|c| Class {
                size: class_size(c),
                map: None,
                free: BTreeSet::new(),
                high: 0,
                live_in_piece: Vec::new(),
                owners: Vec::new(),
                empty: BTreeSet::new(),
                objects: 0,
                object_bytes: 0,
            })
            .collect();
        Pool {
            classes,
            reserve: capacity_pieces * PIECE_BYTES + MAX_OBJECT,
            capacity_pieces,
            used_pieces: 0,
            empty_pieces: 0,
        }
    }

    /// Stores `bytes` (at most [`MAX_OBJECT`]) for `owner`; `None` when the
    /// pool would exceed its capacity, or its memory cannot be had.
    pub(crate) fn store(&mut self, bytes: &[u8], owner: u32) -> Option<Handle> {
        let c = class_of(bytes.len())?;
        let reserve = self.reserve;
        let class = &mut self.classes[c];
        if class.map.is_none() {
            let map = Mapping::anonymous(reserve.next_multiple_of(PAGE_SIZE), Protection::ReadWrite, PAGE_SIZE).ok()?;
            // Pieces are freed one by one: a huge page would pin them all.
            let _ = map.advise_no_huge(0, map.len());
            class.map = Some(map);
        }
        let slot = match class.free.first() {
            Some(&s) => s,
            None if (class.high as usize + 1) * class.size <= reserve => class.high,
            None => return None,
        };
        let pieces = class.pieces(slot);
        let unused = |p: &usize| class.live_in_piece.get(*p).is_none_or(|&n| n == 0);
        let fresh = pieces.clone().filter(unused).count();
        let new_ram = pieces.clone().filter(|p| unused(p) && !class.empty.contains(p)).count();
        if self.used_pieces + self.empty_pieces + new_ram > self.capacity_pieces {
            if self.used_pieces + fresh > self.capacity_pieces {
                return None;
            }
            // Room once the empty pieces give their RAM back.
            self.release_empty();
            return self.store(bytes, owner);
        }
        class.map.as_ref()?.write(slot as usize * class.size, bytes).ok()?;
        if slot == class.high {
            class.high += 1;
            class.owners.push(owner);
        } else {
            class.free.remove(&slot);
            class.owners[slot as usize] = owner;
        }
        if class.live_in_piece.len() < pieces.end {
            class.live_in_piece.resize(pieces.end, 0);
        }
        for p in pieces {
            if class.live_in_piece[p] == 0 && class.empty.remove(&p) {
                self.empty_pieces -= 1;
            }
            class.live_in_piece[p] += 1;
        }
        class.objects += 1;
        class.object_bytes += bytes.len();
        self.used_pieces += fresh;
        Some(Handle { class: c as u16, slot })
    }

    /// Copies the first `buf.len()` bytes of the object at `h` into `buf`.
    pub(crate) fn read(&self, h: Handle, buf: &mut [u8]) -> bool {
        let class = &self.classes[h.class as usize];
        buf.len() <= class.size && class.map.as_ref().is_some_and(|m| m.read(h.slot as usize * class.size, buf).is_ok())
    }

    /// Frees the object at `h`, `len` bytes long.
    pub(crate) fn free(&mut self, h: Handle, len: usize) {
        let class = &mut self.classes[h.class as usize];
        class.objects -= 1;
        class.object_bytes -= len;
        let emptied = class.release_slot(h.slot);
        self.used_pieces -= emptied;
        self.empty_pieces += emptied;
    }

    /// Gives back the RAM of the empty pieces, one `MADV_DONTNEED` per run
    /// of them. Returns the bytes given back.
    pub(crate) fn release_empty(&mut self) -> usize {
        let mut released = 0;
        for class in &mut self.classes {
            let Some(map) = &class.map else { continue };
            let mut pieces = std::mem::take(&mut class.empty).into_iter().peekable();
            while let Some(first) = pieces.next() {
                let mut n = 1;
                while pieces.next_if(|&p| p == first + n).is_some() {
                    n += 1;
                }
                let _ = map.discard(first * PIECE_BYTES, n * PIECE_BYTES);
                released += n;
            }
        }
        self.empty_pieces -= released;
        released * PIECE_BYTES
    }

    /// Whether the empty pieces still resident exceed `slack` bytes and a
    /// thirty-second of the RAM the pool uses (counters only: no walk of
    /// classes).
    pub(crate) fn empty_over(&self, slack: usize) -> bool {
        let resident = (self.used_pieces + self.empty_pieces) * PIECE_BYTES;
        self.empty_pieces * PIECE_BYTES > slack.max(resident / 32)
    }

    /// Flips a bit of the object at `h`, `at` bytes in: fault injection.
    pub(crate) fn corrupt(&self, h: Handle, at: usize) {
        let class = &self.classes[h.class as usize];
        if let Some(map) = &class.map {
            let off = h.slot as usize * class.size + at.min(class.size - 1);
            let mut b = [0u8];
            if map.read(off, &mut b).is_ok() {
                let _ = map.write(off, &[b[0] ^ 0x40]);
            }
        }
    }

    /// Moves objects from the highest slots of each class into its lowest
    /// free ones, then gives back the RAM of every empty piece;
    /// `relocate(owner, new)` is told of each move. Returns the bytes of
    /// RAM given back.
    pub(crate) fn compact(&mut self, mut relocate: impl FnMut(u32, Handle)) -> usize {
        let before = self.used_pieces + self.empty_pieces;
        let mut buf = vec![0u8; MAX_OBJECT];
        for (c, class) in self.classes.iter_mut().enumerate() {
            while let Some(&low) = class.free.first() {
                // `high` is trimmed past free slots: the top slot is live.
                let top = class.high - 1;
                if low >= top {
                    break;
                }
                let size = class.size;
                let Some(map) = class.map.as_ref() else { break };
                let copy = map.read(top as usize * size, &mut buf[..size]);
                if copy.and_then(|()| map.write(low as usize * size, &buf[..size])).is_err() {
                    break;
                }
                class.free.remove(&low);
                let owner = class.owners[top as usize];
                class.owners[low as usize] = owner;
                for p in class.pieces(low) {
                    if class.live_in_piece[p] == 0 {
                        self.used_pieces += 1;
                        if class.empty.remove(&p) {
                            self.empty_pieces -= 1;
                        }
                    }
                    class.live_in_piece[p] += 1;
                }
                let emptied = class.release_slot(top);
                self.used_pieces -= emptied;
                self.empty_pieces += emptied;
                relocate(owner, Handle { class: c as u16, slot: low });
            }
        }
        self.release_empty();
        before.saturating_sub(self.used_pieces + self.empty_pieces) * PIECE_BYTES
    }

    /// What the pool holds.
    pub(crate) fn usage(&self) -> PoolUsage {
        let resident = (self.used_pieces + self.empty_pieces) * PIECE_BYTES;
        let mut u =
            PoolUsage { used_bytes: resident, empty_bytes: self.empty_pieces * PIECE_BYTES, ..PoolUsage::default() };
        for class in &self.classes {
            u.objects += class.objects;
            u.object_bytes += class.object_bytes;
            u.slot_bytes += class.objects * class.size;
        }
        u
    }
}

impl Class {
    /// The pieces slot `slot` touches.
    fn pieces(&self, slot: u32) -> std::ops::Range<usize> {
        let start = slot as usize * self.size;
        start / PIECE_BYTES..(start + self.size - 1) / PIECE_BYTES + 1
    }

    /// Frees `slot` and trims `high`; a piece it leaves empty joins
    /// `empty`. Returns how many pieces it emptied.
    fn release_slot(&mut self, slot: u32) -> usize {
        let mut emptied = 0;
        for p in self.pieces(slot) {
            self.live_in_piece[p] -= 1;
            if self.live_in_piece[p] == 0 {
                emptied += 1;
                self.empty.insert(p);
            }
        }
        self.free.insert(slot);
        while self.high > 0 && self.free.last() == Some(&(self.high - 1)) {
            self.free.pop_last();
            self.high -= 1;
        }
        self.owners.truncate(self.high as usize);
        self.live_in_piece.truncate((self.high as usize * self.size).div_ceil(PIECE_BYTES));
        emptied
    }
}

/// The size of class `c`.
fn class_size(c: usize) -> usize {
    if c < SMALL_CLASSES { (c + 1) * SMALL_STEP } else { PAGE_SIZE + (c - SMALL_CLASSES + 1) * LARGE_STEP }
}

/// The class of an object of `len` bytes (`None` when too large, or empty).
fn class_of(len: usize) -> Option<usize> {
    match len {
        0 => None,
        1..=PAGE_SIZE => Some(len.div_ceil(SMALL_STEP) - 1),
        _ if len <= MAX_OBJECT => Some(SMALL_CLASSES + (len - PAGE_SIZE).div_ceil(LARGE_STEP) - 1),
        _ => None,
    }
}
