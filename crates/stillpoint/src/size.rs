//! Sizes and offsets as qemu-img spells them: `512`, `64K`, `1M`, `1.5G`, `2T`.
//!
//! Suffixes are powers of 1024 (`B`/none = bytes, then K, M, G, T, P, E, either case).
//! A fraction is allowed when the result is a whole number of bytes (`1.5K` = 1536).
//! Like qemu-img, results must fit in a signed 64-bit offset.

use std::fmt;

/// Why a size was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeError {
    input: String,
    reason: &'static str,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid size '{}': {} (expected a number of bytes with an optional K, M, G, T, \
             P or E suffix, powers of 1024, at most {})",
            self.input,
            self.reason,
            i64::MAX
        )
    }
}

impl std::error::Error for SizeError {}

/// Parses a size; the result is at most `i64::MAX`.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let err = |reason| SizeError {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    if s.starts_with('-') {
        return Err(err("negative sizes are not allowed"));
    }
    let number_end = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(err("unknown suffix")),
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() && fraction.is_empty() {
        return Err(err("no number"));
    }
    if fraction.contains('.') {
        return Err(err("more than one decimal point"));
    }
    let too_large = || err("too large");
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    let mut bytes = whole.checked_mul(1u128 << shift).ok_or_else(too_large)?;
    if !fraction.is_empty() {
        if fraction.len() > 18 {
            return Err(err("too many decimal places"));
        }
        let digits: u128 = fraction.parse().map_err(|_| err("bad fraction"))?;
        let scaled = digits << shift;
        let denominator = 10u128.pow(fraction.len() as u32);
        if !scaled.is_multiple_of(denominator) {
            return Err(err("not a whole number of bytes"));
        }
        bytes = bytes
            .checked_add(scaled / denominator)
            .ok_or_else(too_large)?;
    }
    if bytes > i64::MAX as u128 {
        return Err(too_large());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_img_spellings_parse() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("7E"), Ok(7 << 60));
        assert_eq!(parse_size("9223372036854775807"), Ok(i64::MAX as u64));
    }

    #[test]
    fn bad_sizes_say_why() {
        for (input, reason) in [
            ("12Q", "unknown suffix"),
            ("-5", "negative"),
            ("", "no number"),
            ("K", "no number"),
            ("0.3", "whole number"),
            ("1.2.3", "decimal point"),
            ("8E", "too large"),
            ("9223372036854775808", "too large"),
            ("99999999999999999999999999999999999999999", "too large"),
        ] {
            let e = parse_size(input).unwrap_err().to_string();
            assert!(e.contains(reason), "{input}: {e}");
            assert!(e.contains(&format!("'{input}'")), "{e}");
        }
    }
}
