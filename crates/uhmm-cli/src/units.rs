//! Parsing and printing of sizes, rates and fractions.

use std::time::Duration;

/// Parses a byte size: a number with an optional suffix K, M, G or T
/// (powers of 1024; `KiB`, `MB`, `k`... are accepted too).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits);
    if num.is_empty() {
        return Err(format!("`{s}` is not a size (expected e.g. 4096, 64K, 256M, 1G)"));
    }
    let n: usize = num.parse().map_err(|e| format!("`{s}`: {e}"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!("`{s}`: unknown suffix `{other}` (use K, M, G or T)"));
        }
    };
    n.checked_mul(1usize << shift).ok_or_else(|| format!("`{s}` is too large"))
}

/// Parses a fraction in `0.0 ..= 1.0`.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let f: f64 = s.trim().parse().map_err(|e| format!("`{s}`: {e}"))?;
    if (0.0..=1.0).contains(&f) { Ok(f) } else { Err(format!("`{s}` is not between 0 and 1")) }
}

/// `bytes` for people: `512 KiB`, `256 MiB`, `1.5 GiB`.
pub fn human(bytes: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 { format!("{v:.0} {}", UNITS[u]) } else { format!("{v:.1} {}", UNITS[u]) }
}

/// `bytes` over `d` in GB/s (10^9 bytes a second).
pub fn gbps(bytes: usize, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 { bytes as f64 / s / 1e9 } else { f64::INFINITY }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_size("8 MB"), Ok(8 << 20));
        assert!(parse_size("M").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
    }

    #[test]
    fn fractions() {
        assert_eq!(parse_fraction("0.25"), Ok(0.25));
        assert_eq!(parse_fraction("1"), Ok(1.0));
        assert!(parse_fraction("1.5").is_err());
        assert!(parse_fraction("x").is_err());
    }

    #[test]
    fn humans() {
        assert_eq!(human(256 << 20), "256 MiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
        assert_eq!(human(100), "100 B");
    }
}
