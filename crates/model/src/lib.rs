//! Models, data sets, partitioners and local training for fedcompress, on burn.
//!
//! A model is a [`ModelKind`] plus a flat parameter vector θ (`Vec<f32>`) whose tensors have
//! PyTorch names, shapes and order ([`ModelKind::tensor_specs`]). Training and evaluation build
//! a burn module from θ on each call and return θ, so callers never handle burn types.

mod backend;
mod data;
mod error;
mod export;
mod nets;
mod partition;
mod spec;
mod train;

pub use backend::Backend;
pub use data::{
    DATA_DIR_ENV, DataOrigin, DataSource, Dataset, SYSTEM_DATA_DIR, load_data, load_dataset,
    resolve_data_dir, resolve_data_origin, subset_data_dir,
};
pub use error::ModelError;
pub use export::{
    LoadedModel, MODEL_METADATA_KEY, load_safetensors, load_safetensors_with_metadata,
    save_safetensors,
};
pub use partition::{Partition, partition};
pub use spec::{IMAGE_SIDE, ModelKind, NUM_CLASSES, TensorSpec};
pub use train::{
    EvalResult, LocalTrainConfig, LocalTrainResult, OptimizerKind, evaluate, train_local,
};
