//! How the compressed store encodes pages: same-filled pages as their word,
//! the rest through a codec (lz4 by default, zstd as an option), kept raw
//! when they do not compress; each object with a checksum.

use std::cell::RefCell;

/// The compressor of a [`CompressStore`](super::CompressStore).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// LZ4 (the `lz4_flex` crate): what zram uses by default, and the
    /// fastest to decompress, which a fault waits for.
    Lz4,
    /// Zstandard at this level (1 to 19): smaller, slower to decompress.
    Zstd(i32),
}

impl Codec {
    /// Parses `lz4`, `zstd` (level 1) or `zstd:N`.
    pub fn parse(s: &str) -> Option<Codec> {
        match s {
            "lz4" => Some(Codec::Lz4),
            "zstd" => Some(Codec::Zstd(1)),
            _ => {
                let level: i32 = s.strip_prefix("zstd:")?.parse().ok()?;
                (1..=19).contains(&level).then_some(Codec::Zstd(level))
            }
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Codec::Lz4 => write!(f, "lz4"),
            Codec::Zstd(level) => write!(f, "zstd:{level}"),
        }
    }
}

/// An object is kept raw when compression leaves more than this share of
/// its bytes (zram's `huge_class_size` is about 3/4 of a page).
const RAW_ABOVE: (usize, usize) = (4, 5);

/// Whether `len` compressed bytes for `orig` bytes are worth keeping.
pub(crate) fn worth_it(len: usize, orig: usize) -> bool {
    len * RAW_ABOVE.1 <= orig * RAW_ABOVE.0
}

thread_local! {
    static ZSTD_C: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static ZSTD_D: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses `src` into `out` (cleared first); `None` when the result is
/// not worth keeping ([`worth_it`]) or the codec failed.
pub(crate) fn compress(codec: Codec, src: &[u8], out: &mut Vec<u8>) -> Option<()> {
    out.clear();
    let len = match codec {
        Codec::Lz4 => {
            out.resize(lz4_flex::block::get_maximum_output_size(src.len()), 0);
            lz4_flex::block::compress_into(src, out).ok()?
        }
        Codec::Zstd(level) => {
            out.resize(zstd::zstd_safe::compress_bound(src.len()), 0);
            ZSTD_C.with_borrow_mut(|c| {
                if c.as_ref().is_none_or(|(l, _)| *l != level) {
                    *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
                }
                c.as_mut()?.1.compress_to_buffer(src, out.as_mut_slice()).ok()
            })?
        }
    };
    out.truncate(len);
    worth_it(len, src.len()).then_some(())
}

/// Decompresses `src` into `dst`, which it must fill exactly.
pub(crate) fn decompress(codec: Codec, src: &[u8], dst: &mut [u8]) -> bool {
    match codec {
        Codec::Lz4 => lz4_flex::block::decompress_into(src, dst).is_ok_and(|n| n == dst.len()),
        Codec::Zstd(_) => ZSTD_D.with_borrow_mut(|d| {
            if d.is_none() {
                *d = zstd::bulk::Decompressor::new().ok();
            }
            d.as_mut().is_some_and(|d| d.decompress_to_buffer(src, dst).is_ok_and(|n| n == dst.len()))
        }),
    }
}

/// The word a page repeats, when it is one word over and over (zram's
/// same-filled pages: zeros, mostly).
pub(crate) fn same_filled(page: &[u8]) -> Option<u64> {
    let (words, rest) = page.as_chunks::<8>();
    let first = *words.first()?;
    (rest.is_empty() && words.iter().all(|w| *w == first)).then(|| u64::from_ne_bytes(first))
}

/// Fills `dst` with `word` over and over.
pub(crate) fn fill_word(dst: &mut [u8], word: u64) {
    if word == 0 {
        dst.fill(0);
        return;
    }
    for w in dst.as_chunks_mut::<8>().0 {
        *w = word.to_ne_bytes();
    }
}

/// The checksum kept beside each object.
pub(crate) fn checksum(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uhmm::PAGE_SIZE;

    #[test]
    fn same_filled_pages_are_found() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert_eq!(same_filled(&page), Some(0));
        fill_word(&mut page, 0xdead_beef_0123_4567);
        assert_eq!(same_filled(&page), Some(0xdead_beef_0123_4567));
        page[PAGE_SIZE - 1] ^= 1;
        assert_eq!(same_filled(&page), None);
    }

    #[test]
    fn codecs_round_trip_and_refuse_noise() {
        let text: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| b"the quick brown fox "[i % 20]).collect();
        let mut noise = vec![0u8; PAGE_SIZE];
        let mut x = 0x1234_5678_9abc_def0u64;
        for b in &mut noise {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for codec in [Codec::Lz4, Codec::Zstd(1), Codec::Zstd(3)] {
            let mut out = Vec::new();
            compress(codec, &text, &mut out).expect("text compresses");
            assert!(out.len() < text.len() / 4, "{codec}");
            let mut back = vec![0u8; text.len()];
            assert!(decompress(codec, &out, &mut back));
            assert_eq!(back, text);
            assert!(!decompress(codec, &out, &mut back[..PAGE_SIZE]), "a wrong size is refused");
            assert!(compress(codec, &noise, &mut out).is_none(), "{codec}: noise is kept raw");
        }
        assert_eq!(Codec::parse("zstd:3"), Some(Codec::Zstd(3)));
        assert_eq!(Codec::parse("zstd:30"), None);
        assert_eq!(Codec::parse("lz4"), Some(Codec::Lz4));
    }
}
