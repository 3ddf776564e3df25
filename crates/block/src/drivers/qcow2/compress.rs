//! Compressed clusters: raw deflate (QEMU's "zlib") or a zstd frame, always exactly one
//! cluster of output. The stored length is rounded up to whole 512-byte sectors, so the
//! input may carry trailing bytes after the stream; both decoders stop at the end of
//! their stream and ignore them.

use std::io::Read;

use super::header::CompressionType;
use super::header::corrupt;
use crate::error::Result;

/// Deflate level: QEMU uses zlib's default, so targets are comparable in size.
const DEFLATE_LEVEL: u8 = 6;

/// Decompresses `input` into `out`, which must be filled exactly.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Deflate => {
            use miniz_oxide::inflate::TINFLStatus;
            use miniz_oxide::inflate::core::DecompressorOxide;
            use miniz_oxide::inflate::core::decompress as inflate;
            use miniz_oxide::inflate::core::inflate_flags;
            let mut state = DecompressorOxide::new();
            let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
            let (status, _, written) = inflate(&mut state, input, out, 0, flags);
            match status {
                TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == out.len() => Ok(()),
                _ => Err(corrupt(format!(
                    "a compressed cluster does not inflate to one cluster ({status:?}, \
                     {written} bytes)"
                ))),
            }
        }
        CompressionType::Zstd => {
            let mut decoder = ruzstd::decoding::StreamingDecoder::new(input)
                .map_err(|e| corrupt(format!("a zstd compressed cluster is invalid: {e}")))?;
            decoder.read_exact(out).map_err(|e| {
                corrupt(format!(
                    "a zstd compressed cluster does not decode to one cluster: {e}"
                ))
            })
        }
    }
}

/// Compresses one cluster; `None` when the result would not be smaller than
/// `limit` bytes (then the cluster is stored uncompressed, as QEMU does).
pub fn compress(kind: CompressionType, input: &[u8], limit: usize) -> Option<Vec<u8>> {
    let out = match kind {
        CompressionType::Deflate => miniz_oxide::deflate::compress_to_vec(input, DEFLATE_LEVEL),
        CompressionType::Zstd => {
            ruzstd::encoding::compress_to_vec(input, ruzstd::encoding::CompressionLevel::Fastest)
        }
    };
    (out.len() < limit).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_algorithms_round_trip_and_ignore_trailing_bytes() {
        let mut cluster = vec![0u8; 65536];
        for (i, b) in cluster.iter_mut().enumerate() {
            *b = (i / 100) as u8;
        }
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let mut stored = compress(kind, &cluster, cluster.len()).unwrap();
            stored.extend_from_slice(&[0xaa; 300]);
            let mut out = vec![0u8; 65536];
            decompress(kind, &stored, &mut out).unwrap();
            assert!(out == cluster, "{kind:?}");
            // Truncated input is an error, never a short cluster.
            let mut out = vec![0u8; 65536];
            assert!(decompress(kind, &stored[..stored.len() / 4], &mut out).is_err());
        }
    }

    #[test]
    fn incompressible_data_is_left_uncompressed() {
        let mut state = 0x1234_5678_u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        assert!(compress(CompressionType::Deflate, &noise, noise.len()).is_none());
    }
}
