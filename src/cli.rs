//! Command-line interface: flags, their help text and how they override the config file.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::settings::RunConfig;

/// Federated training that prunes and compresses the model while it trains.
#[derive(Debug, Parser)]
#[command(name = "fedcompress", version, about)]
pub struct Cli {
    /// Log filter, as in RUST_LOG (for example `info` or `fedcompress_coordinator=debug`);
    /// also read from FEDCOMPRESS_LOG.
    #[arg(long, global = true, env = "FEDCOMPRESS_LOG")]
    pub log: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a whole training job on this machine: a coordinator and worker processes on loopback.
    Run(RunArgs),
    /// Run the coordinator: hold the global model and drive the rounds.
    Coordinator(CoordinatorArgs),
    /// Run a worker: join a coordinator and train its clients.
    Worker(WorkerArgs),
    /// Evaluate a saved model on the test set.
    Eval(EvalArgs),
}

/// Settings shared by `run` and `coordinator`; each overrides the same key of `--config`.
#[derive(Debug, Args)]
pub struct RunSettingsArgs {
    /// TOML file with any of the settings below (keys are the flag names with `_`); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model: `mlp`, `cnn`, or `synthetic:NAME=DxD,...` (a least-squares test workload).
    #[arg(long)]
    pub model: Option<String>,
    /// Number of clients (data partitions).
    #[arg(long)]
    pub clients: Option<usize>,
    /// Number of worker processes that host the clients.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Maximum number of rounds.
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Data partition: `iid`, `dirichlet:ALPHA` (label skew) or `shards:K` (K labels per client).
    #[arg(long)]
    pub partition: Option<String>,
    /// Local epochs per round (E).
    #[arg(long)]
    pub local_epochs: Option<u32>,
    /// Mini-batch size of local training, in samples.
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Learning rate of local training.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Local optimizer: `sgd` (with momentum) or `adam`.
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Momentum of local SGD.
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Stop local training early when an epoch changes the parameters by less than this
    /// relative amount; 0 always runs every epoch.
    #[arg(long)]
    pub local_tol: Option<f64>,
    /// Seed of partitioning, initialization, shuffling and client selection.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Directory of the IDX files; else FEDCOMPRESS_DATA, /usr/share/datasets/fashion-mnist,
    /// then the subset shipped in the repository.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Output directory: metrics.jsonl, report.json and the model files.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Training backend: `flex` (CPU, default) or `tch` (libtorch; needs the `tch` build feature).
    #[arg(long)]
    pub backend: Option<String>,
    /// Fraction of the clients selected each round, in (0, 1].
    #[arg(long)]
    pub client_fraction: Option<f64>,
    /// Minimum number of updates a round needs once its deadline has passed.
    #[arg(long)]
    pub quorum: Option<usize>,
    /// Time a round waits for updates, in seconds.
    #[arg(long)]
    pub round_timeout_secs: Option<f64>,
    /// Time the first round waits for all clients to join, in seconds.
    #[arg(long)]
    pub join_timeout_secs: Option<f64>,
    /// A worker silent for this long is dropped from the round, in seconds.
    #[arg(long)]
    pub heartbeat_timeout_secs: Option<f64>,
    /// Shard assignment: `all`, `partition` or `replicas:K`.
    #[arg(long)]
    pub assignment: Option<String>,
    /// Aggregation rule: `mean`, `median` or `trimmed:F`.
    #[arg(long)]
    pub aggregation: Option<String>,
    /// Learning rate of the server step (1 is plain FedAvg).
    #[arg(long)]
    pub server_lr: Option<f64>,
    /// Momentum of the server step (FedAvgM); 0 disables.
    #[arg(long)]
    pub server_momentum: Option<f64>,
    /// Fraction of each shard's update entries sent, by magnitude, with error feedback; 1 sends all.
    #[arg(long)]
    pub top_k: Option<f64>,
    /// Quantization of sent update values: `none`, `int8` or `ternary`.
    #[arg(long)]
    pub quantization: Option<String>,
    /// Tensors with more elements than this are split into several shards.
    #[arg(long)]
    pub max_shard_elems: Option<usize>,
    /// Upper bound of a stream chunk's payload, in bytes.
    #[arg(long)]
    pub chunk_bytes: Option<usize>,
    /// Global convergence: relative change of the model under which a round counts as converged; 0 disables.
    #[arg(long)]
    pub tol: Option<f64>,
    /// Consecutive converged rounds that end the run.
    #[arg(long)]
    pub patience: Option<u32>,
    /// Test accuracy in (0, 1] that ends the run when reached.
    #[arg(long)]
    pub target_accuracy: Option<f64>,
    /// Shared secret that workers must present when they join.
    #[arg(long, env = "FEDCOMPRESS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Prune to this final sparsity, in [0, 1): the fraction of weights set to zero (biases
    /// are not pruned unless --prune-biases). With --structure, it is the fraction of hidden
    /// units removed from each layer.
    #[arg(long)]
    pub target_sparsity: Option<f64>,
    /// Prune until this many prunable (weight) parameters are kept.
    #[arg(long)]
    pub target_params: Option<usize>,
    /// Pruning schedule: `gradual` (cubic, Zhu and Gupta 2017) or `one_shot`.
    #[arg(long)]
    pub prune_schedule: Option<String>,
    /// Sparsity the gradual schedule starts from, in [0, 1).
    #[arg(long)]
    pub prune_initial: Option<f64>,
    /// Round of the first pruning step.
    #[arg(long)]
    pub prune_start: Option<u64>,
    /// Rounds between gradual pruning steps.
    #[arg(long)]
    pub prune_every: Option<u64>,
    /// Number of gradual pruning steps.
    #[arg(long)]
    pub prune_steps: Option<u64>,
    /// Magnitude threshold: `global` (across layers) or `per_layer`.
    #[arg(long)]
    pub prune_scope: Option<String>,
    /// Also prune biases and scalars (off by default).
    #[arg(long)]
    pub prune_biases: bool,
    /// Structured pruning: `neurons` (mlp) or `channels` (cnn); the exported compact model is
    /// truly smaller.
    #[arg(long)]
    pub structure: Option<String>,
}

macro_rules! override_fields {
    ($args:expr, $config:expr, [$($field:ident),* $(,)?]) => {
        $(if let Some(value) = $args.$field.clone() {
            $config.$field = value;
        })*
    };
}

impl RunSettingsArgs {
    /// Returns the config file (or the defaults) with every given flag applied.
    pub fn resolve(&self) -> Result<RunConfig, crate::UsageError> {
        let mut config = match &self.config {
            Some(path) => RunConfig::from_file(path)?,
            None => RunConfig::default(),
        };
        override_fields!(
            self,
            config,
            [
                model,
                clients,
                workers,
                rounds,
                partition,
                local_epochs,
                batch_size,
                lr,
                optimizer,
                momentum,
                local_tol,
                seed,
                out,
                backend,
                client_fraction,
                round_timeout_secs,
                join_timeout_secs,
                heartbeat_timeout_secs,
                assignment,
                aggregation,
                server_lr,
                server_momentum,
                top_k,
                quantization,
                max_shard_elems,
                chunk_bytes,
                tol,
                patience,
                token,
                prune_schedule,
                prune_initial,
                prune_start,
                prune_every,
                prune_steps,
                prune_scope,
            ]
        );
        if self.prune_biases {
            config.prune_biases = true;
        }
        if self.target_sparsity.is_some() {
            config.target_sparsity = self.target_sparsity;
        }
        if self.target_params.is_some() {
            config.target_params = self.target_params;
        }
        if self.structure.is_some() {
            config.structure = self.structure.clone();
        }
        if self.data_dir.is_some() {
            config.data_dir = self.data_dir.clone();
        }
        if self.quorum.is_some() {
            config.quorum = self.quorum;
        }
        if self.target_accuracy.is_some() {
            config.target_accuracy = self.target_accuracy;
        }
        Ok(config)
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub settings: RunSettingsArgs,
    /// Hide the progress bar (the per-round lines are still printed).
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub settings: RunSettingsArgs,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Write the bound port to this file once listening (useful with port 0).
    #[arg(long)]
    pub port_file: Option<PathBuf>,
    /// Directory of the round checkpoints; default OUT/checkpoints.
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Number of newest checkpoints kept; 0 keeps all.
    #[arg(long, default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Continue from the newest checkpoint in this directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// TLS certificate chain of the coordinator (PEM); enables TLS together with --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key of the coordinator (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Address of the coordinator, such as http://127.0.0.1:50051.
    #[arg(long)]
    pub coordinator: String,
    /// Stable worker name; a restarted worker with the same name takes its old place.
    #[arg(long)]
    pub name: String,
    /// Ids of the clients this worker hosts, comma separated (for example 0,3,6).
    #[arg(long, value_delimiter = ',', required = true)]
    pub clients: Vec<u32>,
    /// Model the coordinator trains: `mlp`, `cnn` or `synthetic` (the least-squares workload).
    #[arg(long, default_value = "mlp")]
    pub model: String,
    /// Total number of clients of the run, for partitioning the data.
    #[arg(long)]
    pub num_clients: Option<usize>,
    /// Data partition: `iid`, `dirichlet:ALPHA` or `shards:K`; must match the other workers.
    #[arg(long, default_value = "iid")]
    pub partition: String,
    /// Seed of partitioning and of the synthetic workload; must match the other workers.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Directory of the IDX files (see `run --help`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Training backend: `flex` or `tch`.
    #[arg(long, default_value = "flex")]
    pub backend: String,
    /// Shared secret of the run.
    #[arg(
        long,
        env = "FEDCOMPRESS_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    pub token: String,
    /// Attempts to reach the coordinator before giving up.
    #[arg(long, default_value_t = 30)]
    pub connect_attempts: u32,
    /// CA certificate (PEM) that signed the coordinator's certificate; enables TLS
    /// (use an https:// address).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Server name expected in the coordinator's certificate.
    #[arg(long, default_value = "localhost")]
    pub tls_domain: String,
    /// Synthetic workload only: sample count of every client, in place of the seeded one.
    #[arg(long)]
    pub samples: Option<u64>,
    /// Fault injection for tests: sleep this long in every local update, in milliseconds,
    /// to act as a slow client.
    #[arg(long, default_value_t = 0)]
    pub train_delay_ms: u64,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model file written by a run (model.safetensors).
    pub model: PathBuf,
    /// Directory of the IDX files (see `run --help`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Backend: `flex` or `tch`.
    #[arg(long, default_value = "flex")]
    pub backend: String,
}
