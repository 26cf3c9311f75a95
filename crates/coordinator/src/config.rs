//! Settings of a run that the coordinator uses.

use serde::{Deserialize, Serialize};

use fedcompress_core::{AggregationRule, AssignmentPolicy, Quantization, ServerStep};

/// Local training settings sent to the workers with every task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalConfig {
    /// Local epochs per round (E).
    pub epochs: u32,
    /// Learning rate of the local optimizer.
    pub lr: f64,
    pub batch_size: u32,
    /// "sgd" (with momentum) or "adam".
    pub optimizer: String,
    /// Momentum of SGD; ignored by Adam.
    pub momentum: f64,
    /// Relative change of the parameters over one epoch under which local training stops
    /// early; 0 always runs every epoch.
    pub local_tol: f64,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            lr: 0.02,
            batch_size: 32,
            optimizer: "sgd".into(),
            momentum: 0.9,
            local_tol: 0.0,
        }
    }
}

/// Compression of the updates the workers send.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressionConfig {
    /// Fraction of each shard's update entries sent, by magnitude; the rest waits in the
    /// client's residual (error feedback). 1 sends every entry.
    pub top_k: f64,
    pub quantization: Quantization,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            top_k: 1.0,
            quantization: Quantization::None,
        }
    }
}

/// Everything the coordinator needs to run rounds, apart from the model itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Number of clients that must join before the first round starts.
    pub clients: usize,
    /// Fraction of the clients selected each round, in (0, 1].
    pub client_fraction: f64,
    /// Maximum number of rounds.
    pub rounds: u64,
    /// Minimum number of client updates a round needs once its deadline has passed;
    /// `None` means half of the selected clients, rounded up.
    pub quorum: Option<usize>,
    /// Time a round waits for updates, in seconds.
    pub round_timeout_secs: f64,
    /// Times a round that missed its quorum is run again before the run stops.
    pub max_round_retries: u32,
    /// Time the first round waits for all clients to join, in seconds.
    pub join_timeout_secs: f64,
    /// Interval of worker heartbeats, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// A worker silent for this long is taken for dead and dropped from the round, in seconds.
    pub heartbeat_timeout_secs: f64,
    pub assignment: AssignmentPolicy,
    pub aggregation: AggregationRule,
    pub server_step: ServerStep,
    /// Tensors with more elements than this are split into several shards.
    pub max_shard_elems: usize,
    /// Upper bound of a stream chunk's payload, in bytes.
    pub chunk_bytes: usize,
    /// Seed of client selection.
    pub seed: u64,
    /// Shared secret that workers present at Join; empty accepts every worker.
    pub token: String,
    pub local: LocalConfig,
    pub compression: CompressionConfig,
    /// Relative change of the global model under which a round counts as converged; 0 disables.
    pub tol: f64,
    /// Consecutive converged rounds that end the run.
    pub patience: u32,
    /// Test accuracy that ends the run when reached; `None` disables.
    pub target_accuracy: Option<f64>,
    /// Directory of the round checkpoints; `None` writes none.
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// Number of newest checkpoints kept; 0 keeps all.
    pub keep_checkpoints: usize,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            clients: 1,
            client_fraction: 1.0,
            rounds: 10,
            quorum: None,
            round_timeout_secs: 3600.0,
            max_round_retries: 2,
            join_timeout_secs: 300.0,
            heartbeat_interval_ms: 2000,
            heartbeat_timeout_secs: 15.0,
            assignment: AssignmentPolicy::All,
            aggregation: AggregationRule::Mean,
            server_step: ServerStep::default(),
            // 1 Mi elements: a 4 MiB shard keeps the per-shard overhead (header, checksum,
            // one aggregation task) small next to its payload.
            max_shard_elems: 1 << 20,
            // 1 MiB stays well under tonic's default 4 MiB message limit.
            chunk_bytes: 1 << 20,
            seed: 0,
            token: String::new(),
            local: LocalConfig::default(),
            compression: CompressionConfig::default(),
            tol: 0.0,
            patience: 3,
            target_accuracy: None,
            checkpoint_dir: None,
            keep_checkpoints: 2,
        }
    }
}

/// A setting that cannot work, with the key and the value that broke it.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid setting `{key}` = {value}: {reason}")]
pub struct ConfigError {
    pub key: &'static str,
    pub value: String,
    pub reason: String,
}

fn invalid(key: &'static str, value: impl ToString, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key,
        value: value.to_string(),
        reason: reason.into(),
    }
}

impl CoordinatorConfig {
    /// Number of clients selected per round.
    pub fn clients_per_round(&self) -> usize {
        ((self.clients as f64 * self.client_fraction).round() as usize)
            .clamp(1, self.clients.max(1))
    }

    /// Quorum of a round that selected `selected` clients.
    pub fn quorum_for(&self, selected: usize) -> usize {
        self.quorum
            .unwrap_or(selected.div_ceil(2))
            .min(selected)
            .max(1)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.clients == 0 {
            return Err(invalid("clients", 0, "a run needs at least one client"));
        }
        if !(self.client_fraction > 0.0 && self.client_fraction <= 1.0) {
            return Err(invalid(
                "client_fraction",
                self.client_fraction,
                "must be in (0, 1]",
            ));
        }
        if self.rounds == 0 {
            return Err(invalid("rounds", 0, "a run needs at least one round"));
        }
        let per_round = self.clients_per_round();
        if let Some(quorum) = self.quorum
            && (quorum == 0 || quorum > per_round)
        {
            return Err(invalid(
                "quorum",
                quorum,
                format!("must be between 1 and the {per_round} clients selected per round"),
            ));
        }
        if let AssignmentPolicy::Replicas(k) = self.assignment
            && k > per_round
        {
            return Err(invalid(
                "assignment",
                self.assignment,
                format!("more replicas than the {per_round} clients selected per round"),
            ));
        }
        for (key, value) in [
            ("round_timeout_secs", self.round_timeout_secs),
            ("join_timeout_secs", self.join_timeout_secs),
            ("heartbeat_timeout_secs", self.heartbeat_timeout_secs),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(invalid(key, value, "must be a positive number of seconds"));
            }
        }
        if self.heartbeat_interval_ms == 0
            || self.heartbeat_interval_ms as f64 / 1000.0 >= self.heartbeat_timeout_secs
        {
            return Err(invalid(
                "heartbeat_interval_ms",
                self.heartbeat_interval_ms,
                "must be positive and shorter than heartbeat_timeout_secs",
            ));
        }
        if self.max_shard_elems == 0 {
            return Err(invalid("max_shard_elems", 0, "must be at least 1"));
        }
        if !(1024..=(64 << 20)).contains(&self.chunk_bytes) {
            return Err(invalid(
                "chunk_bytes",
                self.chunk_bytes,
                "must be between 1 KiB and 64 MiB",
            ));
        }
        if self.local.epochs == 0 {
            return Err(invalid("local.epochs", 0, "must be at least 1"));
        }
        if !(self.local.lr.is_finite() && self.local.lr > 0.0) {
            return Err(invalid(
                "local.lr",
                self.local.lr,
                "must be a positive number",
            ));
        }
        if self.local.batch_size == 0 {
            return Err(invalid("local.batch_size", 0, "must be at least 1"));
        }
        if !matches!(self.local.optimizer.as_str(), "sgd" | "adam") {
            return Err(invalid(
                "local.optimizer",
                &self.local.optimizer,
                "expected `sgd` or `adam`",
            ));
        }
        if !(0.0..1.0).contains(&self.local.momentum) {
            return Err(invalid(
                "local.momentum",
                self.local.momentum,
                "must be in [0, 1)",
            ));
        }
        if !(self.local.local_tol >= 0.0 && self.local.local_tol.is_finite()) {
            return Err(invalid(
                "local.local_tol",
                self.local.local_tol,
                "must be >= 0",
            ));
        }
        if !(self.compression.top_k > 0.0 && self.compression.top_k <= 1.0) {
            return Err(invalid(
                "compression.top_k",
                self.compression.top_k,
                "must be in (0, 1]",
            ));
        }
        if !(self.tol >= 0.0 && self.tol.is_finite()) {
            return Err(invalid("tol", self.tol, "must be >= 0"));
        }
        if self.patience == 0 {
            return Err(invalid("patience", 0, "must be at least 1"));
        }
        if let Some(target) = self.target_accuracy
            && !(target > 0.0 && target <= 1.0)
        {
            return Err(invalid("target_accuracy", target, "must be in (0, 1]"));
        }
        match self.server_step {
            ServerStep::Plain { lr }
            | ServerStep::Momentum { lr, .. }
            | ServerStep::Adam { lr, .. }
                if !(lr.is_finite() && lr > 0.0) =>
            {
                return Err(invalid("server_step.lr", lr, "must be a positive number"));
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_default_is_valid() {
        CoordinatorConfig::default().validate().unwrap();
    }

    type Mutation = Box<dyn Fn(&mut CoordinatorConfig)>;

    #[test]
    fn config_rejects_inconsistent_settings() {
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "quorum",
                Box::new(|c| {
                    c.clients = 4;
                    c.quorum = Some(5);
                }),
            ),
            ("client_fraction", Box::new(|c| c.client_fraction = 0.0)),
            ("clients", Box::new(|c| c.clients = 0)),
            ("rounds", Box::new(|c| c.rounds = 0)),
            (
                "local.optimizer",
                Box::new(|c| c.local.optimizer = "rmsprop".into()),
            ),
            ("compression.top_k", Box::new(|c| c.compression.top_k = 0.0)),
            ("chunk_bytes", Box::new(|c| c.chunk_bytes = 10)),
        ];
        for (key, mutate) in cases {
            let mut config = CoordinatorConfig::default();
            mutate(&mut config);
            let error = config.validate().unwrap_err();
            assert_eq!(error.key, key, "{error}");
        }
    }

    #[test]
    fn config_rejects_unknown_keys() {
        let error = toml::from_str::<CoordinatorConfig>("roundz = 3").unwrap_err();
        assert!(error.to_string().contains("roundz"), "{error}");
    }
}
