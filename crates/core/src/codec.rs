//! Wire codecs: checksums, f32 byte order, and the encodings of a shard's update.
//!
//! Every encoding describes one shard, and positions index the shard's elements. A shard with
//! a mask carries values only for kept positions. A decoder rejects a position the mask
//! prunes, so a pruned parameter is never updated.
//!
//! | encoding | bytes |
//! | --- | --- |
//! | dense | one f32 per kept position, in order |
//! | sparse | varint count k, k varint gaps, k f32 values |
//! | sparse int8 | varint k, k gaps, f32 scale, k i8 (value = q·scale/127) |
//! | sparse ternary | varint k, k gaps, f32 scale, ⌈k/8⌉ sign bytes (value = ±scale) |
//!
//! A gap is the distance from the previous position minus one; the first gap is the first
//! position. All numbers are little-endian.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// CRC-32 (IEEE) of `bytes`: the checksum of a shard's encoded values.
pub fn checksum(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Appends `values` to `out` as little-endian f32.
pub fn put_f32s(out: &mut Vec<u8>, values: impl IntoIterator<Item = f32>) {
    for value in values {
        out.extend_from_slice(&value.to_le_bytes());
    }
}

/// Reads little-endian f32 values; `None` when the length is not a multiple of 4.
pub fn f32s_from_bytes(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("wrong length: expected {expected} bytes, got {got}")]
    Length { expected: usize, got: usize },
    #[error("truncated payload: {0}")]
    Truncated(&'static str),
    #[error("position {position} is outside the shard of {len} elements")]
    PositionOutOfRange { position: usize, len: usize },
    #[error("position {0} is pruned and cannot be updated")]
    PrunedPosition(usize),
    #[error("positions must ascend; {0} repeats or goes back")]
    Unordered(usize),
    #[error("non-finite value at position {0}")]
    NonFinite(usize),
    #[error("{0} trailing bytes after the payload")]
    Trailing(usize),
}

/// Quantization of the values of a shard's update.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// f32 values.
    #[default]
    None,
    /// A shared f32 scale and one i8 per value.
    Int8,
    /// A shared f32 scale (the mean magnitude) and one sign bit per value.
    Ternary,
}

impl FromStr for Quantization {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "none" => Ok(Self::None),
            "int8" => Ok(Self::Int8),
            "ternary" => Ok(Self::Ternary),
            _ => Err(format!(
                "invalid quantization `{text}`: expected `none`, `int8` or `ternary`"
            )),
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Int8 => "int8",
            Self::Ternary => "ternary",
        })
    }
}

/// The encoding of one shard's update on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateEncoding {
    Dense,
    Sparse(Quantization),
}

/// Encodes the update of one shard. `keep` returns, per shard element, whether it is kept;
/// `None` keeps all. With `top_k` < 1 only that fraction of the kept entries with the largest
/// magnitude is sent, and what is not sent (plus the quantization error) is added to
/// `residual` for the next round (error feedback). `residual` has the shard's length.
pub fn encode_update(
    delta: &[f32],
    keep: Option<&dyn Fn(usize) -> bool>,
    top_k: f64,
    quantization: Quantization,
    residual: Option<&mut [f32]>,
) -> (UpdateEncoding, Vec<u8>) {
    let kept = |i: usize| keep.is_none_or(|f| f(i));
    let mut corrected: Vec<f32> = delta.to_vec();
    if let Some(residual) = residual.as_deref() {
        for (value, carried) in corrected.iter_mut().zip(residual) {
            *value += carried;
        }
    }

    let kept_positions: Vec<usize> = (0..delta.len()).filter(|&i| kept(i)).collect();
    if top_k >= 1.0 && quantization == Quantization::None {
        let mut out = Vec::with_capacity(kept_positions.len() * 4);
        put_f32s(&mut out, kept_positions.iter().map(|&i| corrected[i]));
        if let Some(residual) = residual {
            residual.fill(0.0);
        }
        return (UpdateEncoding::Dense, out);
    }

    let count = ((kept_positions.len() as f64 * top_k.clamp(0.0, 1.0)).ceil() as usize)
        .min(kept_positions.len());
    let mut chosen = kept_positions;
    if count < chosen.len() {
        chosen.select_nth_unstable_by(count, |&a, &b| {
            corrected[b].abs().total_cmp(&corrected[a].abs())
        });
        chosen.truncate(count);
    }
    chosen.sort_unstable();

    let mut out = Vec::new();
    put_varint(&mut out, chosen.len() as u64);
    let mut previous: Option<usize> = None;
    for &position in &chosen {
        let gap = match previous {
            None => position,
            Some(p) => position - p - 1,
        };
        put_varint(&mut out, gap as u64);
        previous = Some(position);
    }

    let sent: Vec<f32> = match quantization {
        Quantization::None => {
            let values: Vec<f32> = chosen.iter().map(|&i| corrected[i]).collect();
            put_f32s(&mut out, values.iter().copied());
            values
        }
        Quantization::Int8 => {
            let scale = chosen
                .iter()
                .map(|&i| corrected[i].abs())
                .fold(0.0f32, f32::max);
            put_f32s(&mut out, [scale]);
            chosen
                .iter()
                .map(|&i| {
                    let q = if scale > 0.0 {
                        (corrected[i] / scale * 127.0).round().clamp(-127.0, 127.0)
                    } else {
                        0.0
                    };
                    out.push(q as i8 as u8);
                    q * scale / 127.0
                })
                .collect()
        }
        Quantization::Ternary => {
            let scale = if chosen.is_empty() {
                0.0
            } else {
                chosen.iter().map(|&i| corrected[i].abs()).sum::<f32>() / chosen.len() as f32
            };
            put_f32s(&mut out, [scale]);
            let mut signs = vec![0u8; chosen.len().div_ceil(8)];
            let values = chosen
                .iter()
                .enumerate()
                .map(|(k, &i)| {
                    if corrected[i] < 0.0 {
                        signs[k / 8] |= 1 << (k % 8);
                        -scale
                    } else {
                        scale
                    }
                })
                .collect();
            out.extend_from_slice(&signs);
            values
        }
    };

    if let Some(residual) = residual {
        residual.copy_from_slice(&corrected);
        for (&position, &value) in chosen.iter().zip(&sent) {
            residual[position] -= value;
        }
        for (i, slot) in residual.iter_mut().enumerate() {
            if !kept(i) {
                *slot = 0.0;
            }
        }
    }
    (UpdateEncoding::Sparse(quantization), out)
}

/// Decodes one shard's update into a dense vector of `len` elements, rejecting wrong
/// lengths, bad positions, pruned positions and non-finite values.
pub fn decode_update(
    encoding: UpdateEncoding,
    bytes: &[u8],
    len: usize,
    keep: Option<&dyn Fn(usize) -> bool>,
) -> Result<Vec<f32>, CodecError> {
    let kept = |i: usize| keep.is_none_or(|f| f(i));
    let mut dense = vec![0.0f32; len];
    match encoding {
        UpdateEncoding::Dense => {
            let positions: Vec<usize> = (0..len).filter(|&i| kept(i)).collect();
            if bytes.len() != positions.len() * 4 {
                return Err(CodecError::Length {
                    expected: positions.len() * 4,
                    got: bytes.len(),
                });
            }
            let values = f32s_from_bytes(bytes).expect("length is a multiple of 4");
            for (&position, value) in positions.iter().zip(values) {
                if !value.is_finite() {
                    return Err(CodecError::NonFinite(position));
                }
                dense[position] = value;
            }
        }
        UpdateEncoding::Sparse(quantization) => {
            let mut reader = Reader { bytes, at: 0 };
            let count = reader.varint()? as usize;
            if count > len {
                return Err(CodecError::PositionOutOfRange {
                    position: count,
                    len,
                });
            }
            let mut positions = Vec::with_capacity(count);
            let mut next = 0usize;
            for _ in 0..count {
                let gap = reader.varint()? as usize;
                let position = next
                    .checked_add(gap)
                    .ok_or(CodecError::PositionOutOfRange { position: gap, len })?;
                if position >= len {
                    return Err(CodecError::PositionOutOfRange { position, len });
                }
                if !kept(position) {
                    return Err(CodecError::PrunedPosition(position));
                }
                positions.push(position);
                next = position + 1;
            }
            let values: Vec<f32> = match quantization {
                Quantization::None => (0..count).map(|_| reader.f32()).collect::<Result<_, _>>()?,
                Quantization::Int8 => {
                    let scale = reader.f32()?;
                    let raw = reader.take(count, "int8 values")?;
                    raw.iter()
                        .map(|&q| q as i8 as f32 * scale / 127.0)
                        .collect()
                }
                Quantization::Ternary => {
                    let scale = reader.f32()?;
                    let signs = reader.take(count.div_ceil(8), "ternary signs")?;
                    (0..count)
                        .map(|k| {
                            if signs[k / 8] >> (k % 8) & 1 == 1 {
                                -scale
                            } else {
                                scale
                            }
                        })
                        .collect()
                }
            };
            if reader.at != bytes.len() {
                return Err(CodecError::Trailing(bytes.len() - reader.at));
            }
            for (&position, value) in positions.iter().zip(values) {
                if !value.is_finite() {
                    return Err(CodecError::NonFinite(position));
                }
                dense[position] = value;
            }
        }
    }
    Ok(dense)
}

/// Appends `value` as an unsigned LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, CodecError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.at)
                .ok_or(CodecError::Truncated("varint"))?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(CodecError::Truncated("varint longer than 10 bytes"))
    }

    fn take(&mut self, count: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        let end = self
            .at
            .checked_add(count)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(CodecError::Truncated(what))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn f32(&mut self) -> Result<f32, CodecError> {
        let b = self.take(4, "f32 value")?;
        Ok(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_detects_change() {
        let mut bytes = Vec::new();
        put_f32s(&mut bytes, [1.0, 2.0, 3.0]);
        let original = checksum(&bytes);
        bytes[5] ^= 1;
        assert_ne!(checksum(&bytes), original);
        assert_eq!(checksum(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn codec_dense_round_trip_with_mask() {
        let delta = [1.0f32, -2.0, 3.0, 4.0];
        let keep = |i: usize| i != 1;
        let (encoding, bytes) = encode_update(&delta, Some(&keep), 1.0, Quantization::None, None);
        assert_eq!(encoding, UpdateEncoding::Dense);
        assert_eq!(bytes.len(), 12);
        let decoded = decode_update(encoding, &bytes, 4, Some(&keep)).unwrap();
        assert_eq!(decoded, vec![1.0, 0.0, 3.0, 4.0]);
    }

    #[test]
    fn codec_sparse_keeps_largest() {
        let delta = [0.1f32, -5.0, 0.2, 3.0, 0.0, 0.05];
        let mut residual = vec![0.0f32; 6];
        let (encoding, bytes) =
            encode_update(&delta, None, 0.33, Quantization::None, Some(&mut residual));
        let decoded = decode_update(encoding, &bytes, 6, None).unwrap();
        assert_eq!(decoded, vec![0.0, -5.0, 0.0, 3.0, 0.0, 0.0]);
        assert_eq!(residual, vec![0.1, 0.0, 0.2, 0.0, 0.0, 0.05]);
    }

    #[test]
    fn codec_error_feedback_sends_residual_later() {
        let delta = [1.0f32, 0.6];
        let mut residual = vec![0.0f32; 2];
        encode_update(&delta, None, 0.5, Quantization::None, Some(&mut residual));
        let (encoding, bytes) =
            encode_update(&delta, None, 0.5, Quantization::None, Some(&mut residual));
        let decoded = decode_update(encoding, &bytes, 2, None).unwrap();
        assert_eq!(decoded, vec![0.0, 1.2]);
    }

    #[test]
    fn codec_quantized_round_trip() {
        let delta = [0.5f32, -1.0, 0.25, 0.0];
        for quantization in [Quantization::Int8, Quantization::Ternary] {
            let (encoding, bytes) = encode_update(&delta, None, 0.75, quantization, None);
            let decoded = decode_update(encoding, &bytes, 4, None).unwrap();
            assert_eq!(decoded[3], 0.0, "{quantization}");
            assert!(decoded[1] < 0.0, "{quantization}");
            assert!(decoded[0] > 0.0, "{quantization}");
        }
        let (encoding, bytes) = encode_update(&delta, None, 1.0, Quantization::Int8, None);
        let decoded = decode_update(encoding, &bytes, 4, None).unwrap();
        assert_eq!(decoded[1], -1.0);
        assert!((decoded[0] - 0.5).abs() < 0.01);
    }

    #[test]
    fn codec_rejects_malformed_payloads() {
        let dense = UpdateEncoding::Dense;
        assert_eq!(
            decode_update(dense, &[0; 7], 2, None),
            Err(CodecError::Length {
                expected: 8,
                got: 7
            })
        );
        let mut nan = Vec::new();
        put_f32s(&mut nan, [1.0, f32::NAN]);
        assert_eq!(
            decode_update(dense, &nan, 2, None),
            Err(CodecError::NonFinite(1))
        );

        let sparse = UpdateEncoding::Sparse(Quantization::None);
        let mut out_of_range = Vec::new();
        put_varint(&mut out_of_range, 1);
        put_varint(&mut out_of_range, 9);
        put_f32s(&mut out_of_range, [1.0]);
        assert!(matches!(
            decode_update(sparse, &out_of_range, 4, None),
            Err(CodecError::PositionOutOfRange { position: 9, .. })
        ));

        let mut pruned = Vec::new();
        put_varint(&mut pruned, 1);
        put_varint(&mut pruned, 2);
        put_f32s(&mut pruned, [1.0]);
        let keep = |i: usize| i != 2;
        assert_eq!(
            decode_update(sparse, &pruned, 4, Some(&keep)),
            Err(CodecError::PrunedPosition(2))
        );
        assert_eq!(
            decode_update(sparse, &pruned[..3], 4, None),
            Err(CodecError::Truncated("f32 value"))
        );
        let mut trailing = pruned.clone();
        trailing.push(0);
        assert_eq!(
            decode_update(sparse, &trailing, 4, None),
            Err(CodecError::Trailing(1))
        );
    }
}
