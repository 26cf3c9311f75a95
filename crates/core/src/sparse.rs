//! The sparse model file: a masked model stored as the positions and values of its kept
//! parameters. A kept parameter takes 5 bytes while its gap is under 128, so at 90%
//! sparsity the file is about an eighth of the dense f32 size.
//!
//! | part | bytes |
//! | --- | --- |
//! | magic | `FCSPARSE1` |
//! | header length | u32 |
//! | header | JSON: `{"tensors": [{"name", "shape", "kept"}, …], "metadata": {…}}` |
//! | per tensor, in header order | `kept` varint gaps, then `kept` f32 values |
//! | checksum | u32 CRC-32 (IEEE) of every byte before it |
//!
//! Positions index the elements of their tensor in row-major order. As in the update codecs,
//! the first gap is the first position and every later gap is the distance from the previous
//! position minus one, so positions ascend. The metadata map of strings to strings is
//! optional.
//! All numbers are little-endian.

use std::collections::BTreeMap;
use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::codec::{checksum, put_f32s, put_varint};
use crate::{Mask, TensorSpec};

/// First bytes of every sparse model file; the trailing digit is the format version.
pub const SPARSE_MAGIC: &[u8; 9] = b"FCSPARSE1";

/// Bytes of the header length and of the checksum.
const U32_BYTES: usize = 4;

/// Smallest encoding of one kept parameter: a one-byte gap and an f32 value.
const MIN_BYTES_PER_KEPT: usize = 1 + 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SparseError {
    #[error(
        "invalid sparse model: the data does not start with `FCSPARSE1`, so it is not a \
         fedcompress sparse model of this version"
    )]
    BadMagic,
    #[error("truncated sparse model: {0} is missing; write the file again")]
    Truncated(String),
    #[error(
        "bad checksum of sparse model: stored {stored:#010x}, computed {computed:#010x}; \
         the file is damaged or truncated, write it again"
    )]
    BadChecksum { stored: u32, computed: u32 },
    #[error("invalid sparse model header: {0}")]
    InvalidHeader(String),
    #[error(
        "invalid sparse model: position {position} is outside tensor `{tensor}` of {len} elements"
    )]
    PositionOutOfRange {
        tensor: String,
        position: u64,
        len: usize,
    },
    #[error("invalid sparse model: a position of tensor `{0}` is a varint longer than 10 bytes")]
    BadVarint(String),
    #[error("invalid sparse model: {0} bytes follow the last tensor")]
    Trailing(usize),
    #[error("sparse model of {elems} parameters does not fit in memory")]
    TooLarge { elems: usize },
}

/// A decoded sparse model file.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseModel {
    pub tensors: Vec<TensorSpec>,
    /// Every parameter in tensor order, with pruned ones set to zero.
    pub params: Vec<f32>,
    pub mask: Mask,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    tensors: Vec<HeaderTensor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderTensor {
    name: String,
    shape: Vec<usize>,
    /// Number of kept parameters of the tensor.
    kept: usize,
}

/// Encodes the kept parameters of `params` (one per element of `tensors`, in order) as a
/// sparse model file. Values of pruned parameters are not stored.
///
/// # Panics
///
/// When `params` or `mask` do not have one entry per element of `tensors`.
pub fn encode_sparse(
    tensors: &[TensorSpec],
    params: &[f32],
    mask: &Mask,
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let total: usize = tensors.iter().map(TensorSpec::numel).sum();
    assert_eq!(params.len(), total, "params must cover every tensor");
    assert_eq!(mask.len(), total, "mask must cover every tensor");

    let mut header = Header {
        tensors: Vec::with_capacity(tensors.len()),
        metadata: metadata.clone(),
    };
    let mut start = 0;
    for tensor in tensors {
        let numel = tensor.numel();
        header.tensors.push(HeaderTensor {
            name: tensor.name.clone(),
            shape: tensor.shape.clone(),
            kept: mask.count_kept_in(start..start + numel),
        });
        start += numel;
    }
    let header_json =
        serde_json::to_vec(&header).expect("a header of strings and integers serializes");
    let header_len =
        u32::try_from(header_json.len()).expect("a header of names and shapes is under 4 GiB");

    let kept_total = mask.count_kept();
    let mut out = Vec::with_capacity(
        SPARSE_MAGIC.len() + 2 * U32_BYTES + header_json.len() + kept_total * MIN_BYTES_PER_KEPT,
    );
    out.extend_from_slice(SPARSE_MAGIC);
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(&header_json);

    let mut start = 0;
    for tensor in tensors {
        let range = start..start + tensor.numel();
        let positions: Vec<usize> = range.clone().filter(|&i| mask.get(i)).collect();
        let mut previous: Option<usize> = None;
        for &position in &positions {
            let gap = match previous {
                None => position - range.start,
                Some(previous) => position - previous - 1,
            };
            put_varint(&mut out, gap as u64);
            previous = Some(position);
        }
        put_f32s(&mut out, positions.iter().map(|&i| params[i]));
        start = range.end;
    }

    let crc = checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a sparse model file, checking its magic, checksum, header and every position.
pub fn decode_sparse(bytes: &[u8]) -> Result<SparseModel, SparseError> {
    if bytes.len() < SPARSE_MAGIC.len() {
        return Err(if SPARSE_MAGIC.starts_with(bytes) {
            SparseError::Truncated("the magic".into())
        } else {
            SparseError::BadMagic
        });
    }
    if &bytes[..SPARSE_MAGIC.len()] != SPARSE_MAGIC {
        return Err(SparseError::BadMagic);
    }
    if bytes.len() < SPARSE_MAGIC.len() + 2 * U32_BYTES {
        return Err(SparseError::Truncated(
            "the header length or the checksum".into(),
        ));
    }

    // The checksum covers everything, so damage is reported as such before any field of the
    // damaged bytes is trusted.
    let (body, stored) = bytes.split_at(bytes.len() - U32_BYTES);
    let stored = u32::from_le_bytes(stored.try_into().expect("split off exactly 4 bytes"));
    let computed = checksum(body);
    if stored != computed {
        return Err(SparseError::BadChecksum { stored, computed });
    }

    let mut reader = Reader {
        bytes: body,
        at: SPARSE_MAGIC.len(),
    };
    let header_len = reader
        .take(U32_BYTES)
        .map(|bytes| u32::from_le_bytes(bytes.try_into().expect("took exactly 4 bytes")))
        .expect("the length check above leaves room for the header length")
        as usize;
    let header_json = reader
        .take(header_len)
        .ok_or_else(|| SparseError::Truncated("part of the header".into()))?;
    let header: Header = serde_json::from_slice(header_json)
        .map_err(|error| SparseError::InvalidHeader(error.to_string()))?;
    let total = validate_header(&header)?;

    let mut params = Vec::new();
    params
        .try_reserve_exact(total)
        .map_err(|_| SparseError::TooLarge { elems: total })?;
    params.resize(total, 0.0f32);
    let mut kept_bits = vec![false; total];

    let mut start = 0;
    for tensor in &header.tensors {
        let numel: usize = tensor.shape.iter().product();
        read_tensor(&mut reader, tensor, numel, |position, value| {
            params[start + position] = value;
            kept_bits[start + position] = true;
        })?;
        start += numel;
    }
    if reader.at != body.len() {
        return Err(SparseError::Trailing(body.len() - reader.at));
    }

    Ok(SparseModel {
        tensors: header
            .tensors
            .into_iter()
            .map(|tensor| TensorSpec::new(tensor.name, tensor.shape))
            .collect(),
        params,
        mask: Mask::from_bools(&kept_bits),
        metadata: header.metadata,
    })
}

/// Checks names, shapes and kept counts, and returns the number of parameters.
fn validate_header(header: &Header) -> Result<usize, SparseError> {
    let mut names = HashSet::new();
    let mut total = 0usize;
    for tensor in &header.tensors {
        if !names.insert(tensor.name.as_str()) {
            return Err(SparseError::InvalidHeader(format!(
                "tensor name `{}` appears twice",
                tensor.name
            )));
        }
        let numel = tensor
            .shape
            .iter()
            .try_fold(1usize, |product, &dim| product.checked_mul(dim))
            .ok_or_else(|| {
                SparseError::InvalidHeader(format!(
                    "shape {:?} of tensor `{}` has more elements than fit in memory",
                    tensor.shape, tensor.name
                ))
            })?;
        if tensor.kept > numel {
            return Err(SparseError::InvalidHeader(format!(
                "tensor `{}` claims {} kept values but has only {numel} elements",
                tensor.name, tensor.kept
            )));
        }
        total = total.checked_add(numel).ok_or_else(|| {
            SparseError::InvalidHeader("the tensors have more elements than fit in memory".into())
        })?;
    }
    Ok(total)
}

/// Reads the gaps and values of one tensor and passes each kept (position, value) to `store`.
fn read_tensor(
    reader: &mut Reader<'_>,
    tensor: &HeaderTensor,
    numel: usize,
    mut store: impl FnMut(usize, f32),
) -> Result<(), SparseError> {
    // Checked before reading so that a damaged count cannot request a huge allocation.
    let remaining = reader.bytes.len() - reader.at;
    if tensor.kept.saturating_mul(MIN_BYTES_PER_KEPT) > remaining {
        return Err(SparseError::Truncated(format!(
            "part of the {} kept values of tensor `{}`",
            tensor.kept, tensor.name
        )));
    }

    let mut positions = Vec::with_capacity(tensor.kept);
    let mut next = 0u64;
    for _ in 0..tensor.kept {
        let gap = reader.varint().map_err(|error| match error {
            VarintError::Truncated => {
                SparseError::Truncated(format!("a position of tensor `{}`", tensor.name))
            }
            VarintError::TooLong => SparseError::BadVarint(tensor.name.clone()),
        })?;
        let position = next.saturating_add(gap);
        if position >= numel as u64 {
            return Err(SparseError::PositionOutOfRange {
                tensor: tensor.name.clone(),
                position,
                len: numel,
            });
        }
        positions.push(position as usize);
        next = position + 1;
    }

    for position in positions {
        let bytes = reader.take(4).ok_or_else(|| {
            SparseError::Truncated(format!("a value of tensor `{}`", tensor.name))
        })?;
        let value = f32::from_le_bytes(bytes.try_into().expect("took exactly 4 bytes"));
        store(position, value);
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

enum VarintError {
    Truncated,
    TooLong,
}

impl<'a> Reader<'a> {
    /// Returns the next `count` bytes, or `None` when fewer are left.
    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        let end = self
            .at
            .checked_add(count)
            .filter(|&end| end <= self.bytes.len())?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Some(slice)
    }

    /// Reads an unsigned LEB128 varint, as written by [`put_varint`].
    fn varint(&mut self) -> Result<u64, VarintError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1).ok_or(VarintError::Truncated)?[0];
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(VarintError::TooLong)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<TensorSpec> {
        vec![
            TensorSpec::new("fc1.weight", [4, 5]),
            TensorSpec::new("fc1.bias", [4]),
            TensorSpec::new("scale", []),
            TensorSpec::new("fc2.weight", [3, 4]),
        ]
    }

    /// Parameters and a mask over [`tensors`] that keeps the first and last element of a
    /// tensor, runs of neighbours and lone positions, and prunes all of `fc1.bias`.
    fn masked_model() -> (Vec<f32>, Mask) {
        let params: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 4.0).collect();
        let kept = |i: usize| match i {
            0..20 => i == 0 || i == 19 || (5..9).contains(&i) || i == 13,
            20..24 => false,
            24 => true,
            _ => i.is_multiple_of(3),
        };
        let bits: Vec<bool> = (0..37).map(kept).collect();
        let mask = Mask::from_bools(&bits);
        let mut params = params;
        for (value, keep) in params.iter_mut().zip(&bits) {
            if !keep {
                *value = 0.0;
            }
        }
        (params, mask)
    }

    fn metadata() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("model".to_owned(), "mlp".to_owned()),
            ("accuracy".to_owned(), "0.8812".to_owned()),
        ])
    }

    /// Recomputes the trailing checksum, so a test can reach the checks behind it.
    fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
        let body_len = bytes.len() - U32_BYTES;
        let crc = checksum(&bytes[..body_len]);
        bytes[body_len..].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Offset of the first tensor's data: after the magic, the length and the header.
    fn data_start(bytes: &[u8]) -> usize {
        let header_len = u32::from_le_bytes(bytes[9..13].try_into().unwrap()) as usize;
        SPARSE_MAGIC.len() + U32_BYTES + header_len
    }

    #[test]
    fn sparse_round_trip() {
        let (params, mask) = masked_model();
        let bytes = encode_sparse(&tensors(), &params, &mask, &metadata());
        assert_eq!(&bytes[..9], b"FCSPARSE1");

        let model = decode_sparse(&bytes).unwrap();
        assert_eq!(model.tensors, tensors());
        assert_eq!(model.mask, mask);
        assert_eq!(model.metadata, metadata());
        assert_eq!(model.params.len(), params.len());
        for (index, (got, expected)) in model.params.iter().zip(&params).enumerate() {
            assert_eq!(got.to_bits(), expected.to_bits(), "parameter {index}");
        }
    }

    #[test]
    fn sparse_round_trip_without_metadata() {
        let (params, mask) = masked_model();
        let bytes = encode_sparse(&tensors(), &params, &mask, &BTreeMap::new());
        let header_len = data_start(&bytes) - 13;
        let header = std::str::from_utf8(&bytes[13..13 + header_len]).unwrap();
        assert!(!header.contains("metadata"), "{header}");

        let model = decode_sparse(&bytes).unwrap();
        assert!(model.metadata.is_empty());
        assert_eq!(model.mask, mask);
    }

    #[test]
    fn sparse_layout_of_first_tensor() {
        let (params, mask) = masked_model();
        let bytes = encode_sparse(&tensors(), &params, &mask, &BTreeMap::new());
        let start = data_start(&bytes);

        // fc1.weight keeps 0, 5, 6, 7, 8, 13 and 19: gaps 0, 4, 0, 0, 0, 4, 5, then 7 values.
        assert_eq!(&bytes[start..start + 7], &[0, 4, 0, 0, 0, 4, 5]);
        let first_value = f32::from_le_bytes(bytes[start + 7..start + 11].try_into().unwrap());
        assert_eq!(first_value, params[0]);
    }

    #[test]
    fn sparse_keeps_zero_values_that_are_kept() {
        let tensors = vec![TensorSpec::new("w", [2, 2])];
        let params = [0.0, -0.0, 1.0, 0.0];
        let mask = Mask::from_bools(&[true, true, false, false]);
        let model =
            decode_sparse(&encode_sparse(&tensors, &params, &mask, &BTreeMap::new())).unwrap();
        assert_eq!(model.mask, mask);
        assert_eq!(model.params[1].to_bits(), (-0.0f32).to_bits());
        assert_eq!(model.params[2], 0.0);
    }

    #[test]
    fn sparse_file_is_small_at_90_percent() {
        let tensors = vec![
            TensorSpec::new("conv.weight", [64, 32, 5, 5]),
            TensorSpec::new("fc.weight", [512, 200]),
        ];
        let total: usize = tensors.iter().map(TensorSpec::numel).sum();
        let params: Vec<f32> = (0..total).map(|i| (i as f32).sin()).collect();
        // Every tenth parameter kept, offset so that gaps vary between tensors.
        let bits: Vec<bool> = (0..total).map(|i| (i * 7) % 10 == 3).collect();
        let mask = Mask::from_bools(&bits);
        assert!((mask.sparsity() - 0.9).abs() < 1e-3);

        let bytes = encode_sparse(&tensors, &params, &mask, &BTreeMap::new());
        let dense_bytes = 4 * total;
        // 4 bytes per value and 1 per gap, for a tenth of the parameters.
        assert!(
            bytes.len() * 7 < dense_bytes,
            "{} bytes for {dense_bytes} dense bytes",
            bytes.len()
        );
        assert_eq!(decode_sparse(&bytes).unwrap().mask, mask);
    }

    #[test]
    fn sparse_rejects_bad_magic() {
        let (params, mask) = masked_model();
        let mut bytes = encode_sparse(&tensors(), &params, &mask, &BTreeMap::new());
        bytes[8] = b'2';
        assert_eq!(decode_sparse(&bytes), Err(SparseError::BadMagic));
        assert_eq!(decode_sparse(b"PK\x03\x04"), Err(SparseError::BadMagic));
        assert_eq!(
            decode_sparse(b""),
            Err(SparseError::Truncated("the magic".into()))
        );
        assert_eq!(
            decode_sparse(b"FCSPA"),
            Err(SparseError::Truncated("the magic".into()))
        );
    }

    #[test]
    fn sparse_detects_damage() {
        let (params, mask) = masked_model();
        let bytes = encode_sparse(&tensors(), &params, &mask, &metadata());

        // Flip one bit in the header, in a gap, in a value and in the checksum.
        let start = data_start(&bytes);
        for index in [15, start + 1, bytes.len() - 6, bytes.len() - 1] {
            let mut damaged = bytes.clone();
            damaged[index] ^= 0x10;
            let error = decode_sparse(&damaged).unwrap_err();
            assert!(
                matches!(error, SparseError::BadChecksum { .. }),
                "byte {index}: {error}"
            );
        }
    }

    #[test]
    fn sparse_detects_truncation() {
        let (params, mask) = masked_model();
        let bytes = encode_sparse(&tensors(), &params, &mask, &BTreeMap::new());
        for len in [12, 16, data_start(&bytes), bytes.len() - 1] {
            let error = decode_sparse(&bytes[..len]).unwrap_err();
            assert!(
                matches!(
                    error,
                    SparseError::Truncated(_) | SparseError::BadChecksum { .. }
                ),
                "length {len}: {error}"
            );
        }
        assert!(matches!(
            decode_sparse(&bytes[..12]),
            Err(SparseError::Truncated(_))
        ));

        // Cut off the last value but reseal, so only the structure shows the loss.
        let mut cut = bytes[..bytes.len() - 8].to_vec();
        cut.extend_from_slice(&[0; 4]);
        let error = decode_sparse(&reseal(cut)).unwrap_err();
        assert!(matches!(error, SparseError::Truncated(_)), "{error}");
        assert!(error.to_string().contains("fc2.weight"), "{error}");
    }

    #[test]
    fn sparse_rejects_position_out_of_range() {
        let tensors = vec![TensorSpec::new("w", [2, 3]), TensorSpec::new("b", [2])];
        let params = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let mask = Mask::from_bools(&[false, false, false, false, false, true, true, true]);
        let mut bytes = encode_sparse(&tensors, &params, &mask, &BTreeMap::new());

        // The one gap of `w` is 5, its last position; 6 is one past its end.
        let start = data_start(&bytes);
        assert_eq!(bytes[start], 5);
        bytes[start] = 6;
        let error = decode_sparse(&reseal(bytes)).unwrap_err();
        assert_eq!(
            error,
            SparseError::PositionOutOfRange {
                tensor: "w".into(),
                position: 6,
                len: 6
            }
        );
        assert!(error.to_string().contains("position 6"), "{error}");
    }

    #[test]
    fn sparse_rejects_trailing_bytes() {
        let (params, mask) = masked_model();
        let bytes = encode_sparse(&tensors(), &params, &mask, &BTreeMap::new());
        let mut longer = bytes[..bytes.len() - U32_BYTES].to_vec();
        longer.extend_from_slice(&[0, 0, 0, 0, 0]);
        assert_eq!(
            decode_sparse(&reseal(longer)),
            Err(SparseError::Trailing(1))
        );
    }

    #[test]
    fn sparse_rejects_bad_header() {
        let cases = [
            (
                r#"{"tensors": [{"name": "w", "shape": [2], "kept": 3}]}"#,
                "claims 3",
            ),
            (
                r#"{"tensors": [{"name": "w", "shape": [1], "kept": 0},
                               {"name": "w", "shape": [1], "kept": 0}]}"#,
                "appears twice",
            ),
            (r#"{"tensors": [], "extra": 1}"#, "unknown field"),
            (r#"{"tensors": "#, "EOF"),
        ];
        for (header, fragment) in cases {
            let mut bytes = SPARSE_MAGIC.to_vec();
            bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend_from_slice(&[0; 4]);
            let error = decode_sparse(&reseal(bytes)).unwrap_err();
            assert!(
                matches!(error, SparseError::InvalidHeader(_)),
                "{header}: {error}"
            );
            assert!(error.to_string().contains(fragment), "{error}");
        }
    }
}
