//! The ranges device operations take: a page-aligned address and a number
//! of pages, checked once for every device.

use std::ops::Range;

use uhmm::{Error, PAGE_SIZE, Result};

/// `npages` pages at `addr` as an address range; an invalid argument when
/// `addr` is not page-aligned, `npages` is zero, or the range overflows.
pub(crate) fn pages_at(addr: usize, npages: usize) -> Result<Range<usize>> {
    if !addr.is_multiple_of(PAGE_SIZE) {
        return Err(Error::invalid("address is not page-aligned"));
    }
    if npages == 0 {
        return Err(Error::invalid("zero pages"));
    }
    let end = npages
        .checked_mul(PAGE_SIZE)
        .and_then(|l| addr.checked_add(l))
        .ok_or_else(|| Error::invalid("range overflows"))?;
    Ok(addr..end)
}
