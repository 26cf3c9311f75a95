//! Pure building blocks of fedcompress: the shard layout, masks, wire codecs, shard
//! assignment, aggregation and byte counters. Nothing here does I/O.

pub mod aggregate;
pub mod assign;
pub mod codec;
pub mod layout;
pub mod mask;
pub mod prune;
pub mod sparse;
pub mod traffic;

pub use aggregate::{
    AggregateError, AggregationRule, ServerState, ServerStep, WeightedUpdate, aggregate_shard,
};
pub use assign::{Assignment, AssignmentError, AssignmentPolicy};
pub use codec::{CodecError, Quantization, UpdateEncoding, checksum};
pub use layout::{LayoutError, Shard, ShardLayout, TensorSpec};
pub use mask::Mask;
pub use prune::{
    Compaction, PruneError, PruneSchedule, PruneScope, PruneTarget, Structure, StructuredGroup,
    kept_units, magnitude_mask, structured_mask,
};
pub use sparse::{SparseError, SparseModel, decode_sparse, encode_sparse};
pub use traffic::{Direction, TrafficCounters, TrafficSnapshot};

/// Identifier of a client (a private data partition), unique in a run.
pub type ClientId = u32;

/// Index of a shard in a [`ShardLayout`].
pub type ShardId = u32;
