//! The shard layout: how the flat parameter vector splits into named tensors and shards.

use serde::{Deserialize, Serialize};
use std::ops::Range;

use crate::ShardId;

/// Name and shape of one tensor of the model; an empty shape is a scalar.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: impl Into<Vec<usize>>) -> Self {
        Self {
            name: name.into(),
            shape: shape.into(),
        }
    }

    /// Number of elements: the product of the shape, 1 for a scalar.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A contiguous slice of one tensor: the unit of transfer, assignment, aggregation and checksum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub id: ShardId,
    /// Index of the tensor in the layout's tensor list.
    pub tensor: usize,
    /// First element of the shard within its tensor.
    pub offset_in_tensor: usize,
    /// Range of the shard within the flat parameter vector.
    pub range: Range<usize>,
}

impl Shard {
    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("invalid shard limit 0: max_shard_elems must be at least 1")]
    ZeroShardLimit,
    #[error("invalid model: it has no tensors")]
    NoTensors,
    #[error("invalid tensor `{name}`: shape {shape:?} has no elements")]
    EmptyTensor { name: String, shape: Vec<usize> },
    #[error("invalid model: tensor name `{0}` appears twice")]
    DuplicateName(String),
    #[error("invalid model: {0} shards exceed the u32 shard id range")]
    TooManyShards(usize),
}

/// Ordered named tensors, cut into shards of at most `max_shard_elems` elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardLayout {
    tensors: Vec<TensorSpec>,
    tensor_ranges: Vec<Range<usize>>,
    shards: Vec<Shard>,
    max_shard_elems: usize,
    total: usize,
}

impl ShardLayout {
    /// Builds the layout; every tensor longer than `max_shard_elems` is split into equal
    /// shards except possibly the last.
    pub fn new(tensors: Vec<TensorSpec>, max_shard_elems: usize) -> Result<Self, LayoutError> {
        if max_shard_elems == 0 {
            return Err(LayoutError::ZeroShardLimit);
        }
        if tensors.is_empty() {
            return Err(LayoutError::NoTensors);
        }

        let mut seen = std::collections::HashSet::new();
        let mut tensor_ranges = Vec::with_capacity(tensors.len());
        let mut shards = Vec::new();
        let mut start = 0;
        for (index, tensor) in tensors.iter().enumerate() {
            if !seen.insert(tensor.name.as_str()) {
                return Err(LayoutError::DuplicateName(tensor.name.clone()));
            }
            let numel = tensor.numel();
            if numel == 0 {
                return Err(LayoutError::EmptyTensor {
                    name: tensor.name.clone(),
                    shape: tensor.shape.clone(),
                });
            }
            tensor_ranges.push(start..start + numel);

            let mut offset = 0;
            while offset < numel {
                let len = max_shard_elems.min(numel - offset);
                let id = ShardId::try_from(shards.len())
                    .map_err(|_| LayoutError::TooManyShards(shards.len() + 1))?;
                shards.push(Shard {
                    id,
                    tensor: index,
                    offset_in_tensor: offset,
                    range: start + offset..start + offset + len,
                });
                offset += len;
            }
            start += numel;
        }

        Ok(Self {
            tensors,
            tensor_ranges,
            shards,
            max_shard_elems,
            total: start,
        })
    }

    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Range of tensor `index` within the flat parameter vector.
    pub fn tensor_range(&self, index: usize) -> Range<usize> {
        self.tensor_ranges[index].clone()
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    pub fn shard(&self, id: ShardId) -> Option<&Shard> {
        self.shards.get(id as usize)
    }

    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    pub fn max_shard_elems(&self) -> usize {
        self.max_shard_elems
    }

    /// Number of parameters of the whole model.
    pub fn total_elems(&self) -> usize {
        self.total
    }

    /// Shards of tensor `index`, in order.
    pub fn shards_of_tensor(&self, index: usize) -> impl Iterator<Item = &Shard> {
        self.shards
            .iter()
            .filter(move |shard| shard.tensor == index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Vec<TensorSpec> {
        vec![
            TensorSpec::new("w", [3, 4]),
            TensorSpec::new("scale", []),
            TensorSpec::new("b", [5]),
        ]
    }

    #[test]
    fn layout_splits_long_tensors() {
        let layout = ShardLayout::new(specs(), 5).unwrap();
        let ranges: Vec<_> = layout.shards().iter().map(|s| s.range.clone()).collect();
        assert_eq!(ranges, vec![0..5, 5..10, 10..12, 12..13, 13..18]);
        assert_eq!(layout.shards()[2].tensor, 0);
        assert_eq!(layout.shards()[2].offset_in_tensor, 10);
        assert_eq!(layout.total_elems(), 18);
    }

    #[test]
    fn layout_scalar_is_one_shard() {
        let layout = ShardLayout::new(specs(), 100).unwrap();
        assert_eq!(layout.num_shards(), 3);
        let scalar = &layout.shards()[1];
        assert_eq!(scalar.tensor, 1);
        assert_eq!(scalar.range, 12..13);
        assert_eq!(layout.tensor_range(1), 12..13);
    }

    #[test]
    fn layout_shards_cover_vector_once() {
        let layout = ShardLayout::new(specs(), 2).unwrap();
        let mut next = 0;
        for (index, shard) in layout.shards().iter().enumerate() {
            assert_eq!(shard.id as usize, index);
            assert_eq!(shard.range.start, next);
            assert!(shard.len() <= 2);
            next = shard.range.end;
        }
        assert_eq!(next, layout.total_elems());
        assert_eq!(layout.shards_of_tensor(0).count(), 6);
    }

    #[test]
    fn layout_rejects_bad_input() {
        assert_eq!(
            ShardLayout::new(specs(), 0),
            Err(LayoutError::ZeroShardLimit)
        );
        assert_eq!(ShardLayout::new(vec![], 4), Err(LayoutError::NoTensors));
        let duplicate = vec![TensorSpec::new("a", [2]), TensorSpec::new("a", [3])];
        assert_eq!(
            ShardLayout::new(duplicate, 4),
            Err(LayoutError::DuplicateName("a".into()))
        );
        let empty = vec![TensorSpec::new("a", [2, 0])];
        assert!(matches!(
            ShardLayout::new(empty, 4),
            Err(LayoutError::EmptyTensor { .. })
        ));
    }
}
