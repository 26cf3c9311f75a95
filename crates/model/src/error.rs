use std::path::PathBuf;

/// How to get Fashion-MNIST, appended to every error about missing or broken data files.
pub(crate) const GET_DATA_HINT: &str = "install the Debian/Ubuntu package with \
     `apt-get install dataset-fashion-mnist` (files under /usr/share/datasets/fashion-mnist) \
     or run `scripts/download-data.sh DIR`";

/// Errors of the model crate. Each message names the bad value and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model `{value}`: expected one of mlp, cnn")]
    UnknownModel { value: String },

    #[error("invalid backend `{value}`: expected one of flex, tch")]
    UnknownBackend { value: String },

    #[error(
        "backend `tch` is not compiled in: rebuild with `--features tch` \
         (needs libtorch), or use the `flex` backend"
    )]
    BackendUnavailable,

    #[error(
        "invalid partition `{value}`: {reason}; \
         expected `iid`, `dirichlet:ALPHA` with ALPHA > 0 or `shards:K` with K >= 1"
    )]
    InvalidPartition { value: String, reason: String },

    #[error("failed to partition {samples} samples over {clients} clients: {reason}")]
    PartitionImpossible {
        samples: usize,
        clients: usize,
        reason: String,
    },

    #[error(
        "invalid optimizer `{value}`: expected `sgd`, `sgd:MOMENTUM` with 0 <= MOMENTUM < 1, or `adam`"
    )]
    InvalidOptimizer { value: String },

    #[error("data directory {} ({origin}) does not exist: {GET_DATA_HINT}", path.display())]
    DataDirNotFound { path: PathBuf, origin: String },

    #[error(
        "no data directory found: tried {}; pass `--data-dir DIR` or set FEDCOMPRESS_DATA, \
         and to get the data {GET_DATA_HINT}",
        tried.join(", ")
    )]
    NoDataDir { tried: Vec<String> },

    #[error("missing {name}.gz (or {name}) in {}: {GET_DATA_HINT}", dir.display())]
    MissingDataFile { dir: PathBuf, name: String },

    #[error("failed to read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid IDX file {}: {reason}; replace it: {GET_DATA_HINT}", path.display())]
    InvalidIdx { path: PathBuf, reason: String },

    #[error(
        "invalid data for model {model}: images are {rows}x{cols}, the model expects 28x28 \
         (MNIST-family data)"
    )]
    ImageSize {
        model: String,
        rows: usize,
        cols: usize,
    },

    #[error("invalid parameter vector for model {model}: {actual} values, expected {expected}")]
    ParamCount {
        model: String,
        expected: usize,
        actual: usize,
    },

    #[error(
        "invalid parameter vector: value {value} at index {index} (tensor `{tensor}`) is not finite; \
         the model diverged or the vector is corrupt"
    )]
    NonFiniteParam {
        index: usize,
        tensor: String,
        value: f32,
    },

    #[error("invalid mask: {actual} keep bits, expected one per parameter ({expected})")]
    MaskLength { expected: usize, actual: usize },

    #[error("invalid sample indices: the list is empty; give each client at least one sample")]
    EmptyIndices,

    #[error("invalid data set: it has no samples")]
    EmptyDataset,

    #[error("invalid data set: {reason}; build it with load_dataset or keep its fields consistent")]
    InconsistentDataset { reason: String },

    #[error("invalid sample index {index}: the data set has {len} samples")]
    IndexOutOfRange { index: usize, len: usize },

    #[error("invalid local training config: {key} = {value}: {reason}")]
    InvalidConfig {
        key: &'static str,
        value: String,
        reason: &'static str,
    },

    #[error(
        "training diverged: mean loss is {loss} in local epoch {epoch}; \
         lower the learning rate (lr = {lr})"
    )]
    NonFiniteLoss { epoch: usize, loss: f64, lr: f64 },

    #[error("failed to compute on the {backend} backend: {reason}")]
    Compute { backend: String, reason: String },

    #[error("failed to write {}: {reason}", path.display())]
    SafetensorsWrite { path: PathBuf, reason: String },

    #[error("invalid safetensors file {}: {reason}", path.display())]
    InvalidSafetensors { path: PathBuf, reason: String },

    #[error("invalid tensor `{tensor}` in {}: {reason}", path.display())]
    InvalidSafetensorsTensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
}
