//! Conversions between the generated protocol types and the domain types of
//! `fedcompress-core`.

use fedcompress_core::{Quantization, TensorSpec, UpdateEncoding};

use crate::pb;

impl From<&TensorSpec> for pb::TensorSpec {
    fn from(spec: &TensorSpec) -> Self {
        Self {
            name: spec.name.clone(),
            shape: spec.shape.iter().map(|&d| d as u64).collect(),
        }
    }
}

impl From<&pb::TensorSpec> for TensorSpec {
    fn from(spec: &pb::TensorSpec) -> Self {
        TensorSpec::new(
            spec.name.clone(),
            spec.shape.iter().map(|&d| d as usize).collect::<Vec<_>>(),
        )
    }
}

impl From<UpdateEncoding> for pb::UpdateEncoding {
    fn from(encoding: UpdateEncoding) -> Self {
        match encoding {
            UpdateEncoding::Dense => Self::Dense,
            UpdateEncoding::Sparse(Quantization::None) => Self::Sparse,
            UpdateEncoding::Sparse(Quantization::Int8) => Self::SparseInt8,
            UpdateEncoding::Sparse(Quantization::Ternary) => Self::SparseTernary,
        }
    }
}

/// Reads the encoding of a shard segment; `None` for an unknown or unspecified value.
pub fn update_encoding(raw: i32) -> Option<UpdateEncoding> {
    match pb::UpdateEncoding::try_from(raw).ok()? {
        pb::UpdateEncoding::Unspecified => None,
        pb::UpdateEncoding::Dense => Some(UpdateEncoding::Dense),
        pb::UpdateEncoding::Sparse => Some(UpdateEncoding::Sparse(Quantization::None)),
        pb::UpdateEncoding::SparseInt8 => Some(UpdateEncoding::Sparse(Quantization::Int8)),
        pb::UpdateEncoding::SparseTernary => Some(UpdateEncoding::Sparse(Quantization::Ternary)),
    }
}

/// Size of a message on the wire, as counted by the traffic counters: the encoded protobuf
/// length, without HTTP/2 and gRPC framing.
pub fn wire_len(message: &impl prost::Message) -> u64 {
    message.encoded_len() as u64
}
