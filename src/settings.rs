//! Settings of a run: defaults, a TOML file given by `--config`, and flags over both.

use std::path::{Path, PathBuf};

use fedcompress_coordinator::{CompressionConfig, CoordinatorConfig, LocalConfig};
use std::sync::Arc;

use fedcompress_coordinator::prune::{PruneMode, SchedulePruner};
use fedcompress_core::prune::{self, PruneScope, Structure, StructuredGroup};
use fedcompress_core::{
    AggregationRule, AssignmentPolicy, PruneSchedule, PruneTarget, Quantization, ServerStep,
    ShardLayout, TensorSpec,
};
use fedcompress_model::{ModelKind, Partition};
use serde::{Deserialize, Serialize};

use crate::UsageError;

/// Every setting of a run; the keys of the TOML file are these field names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// `mlp`, `cnn`, or `synthetic:NAME=DxD,...` (a least-squares test workload).
    pub model: String,
    pub clients: usize,
    pub workers: usize,
    pub rounds: u64,
    pub partition: String,
    pub local_epochs: u32,
    pub batch_size: u32,
    pub lr: f64,
    pub optimizer: String,
    pub momentum: f64,
    pub local_tol: f64,
    pub seed: u64,
    pub data_dir: Option<PathBuf>,
    pub out: PathBuf,
    pub backend: String,
    pub client_fraction: f64,
    pub quorum: Option<usize>,
    pub round_timeout_secs: f64,
    pub join_timeout_secs: f64,
    pub heartbeat_timeout_secs: f64,
    pub assignment: String,
    pub aggregation: String,
    pub server_lr: f64,
    pub server_momentum: f64,
    pub top_k: f64,
    pub quantization: String,
    pub max_shard_elems: usize,
    pub chunk_bytes: usize,
    pub tol: f64,
    pub patience: u32,
    pub target_accuracy: Option<f64>,
    pub token: String,
    /// Final sparsity of the pruning schedule, in [0, 1); `None` with no `target_params`
    /// disables pruning.
    pub target_sparsity: Option<f64>,
    /// Number of prunable (weight) parameters kept at the end, in place of `target_sparsity`.
    pub target_params: Option<usize>,
    /// `gradual` (cubic, Zhu and Gupta 2017) or `one_shot`.
    pub prune_schedule: String,
    /// Sparsity of the first gradual pruning step's starting point.
    pub prune_initial: f64,
    /// Round of the first pruning step.
    pub prune_start: u64,
    /// Rounds between gradual pruning steps.
    pub prune_every: u64,
    /// Number of gradual pruning steps.
    pub prune_steps: u64,
    /// `global` (one magnitude threshold) or `per_layer`.
    pub prune_scope: String,
    /// Also prune biases and scalars.
    pub prune_biases: bool,
    /// Structured pruning: `neurons` (mlp) or `channels` (cnn); `None` prunes single weights.
    pub structure: Option<String>,
}

impl Default for RunConfig {
    fn default() -> Self {
        let coordinator = CoordinatorConfig::default();
        Self {
            model: "mlp".into(),
            clients: 10,
            workers: 2,
            rounds: 20,
            partition: "iid".into(),
            local_epochs: 1,
            batch_size: 32,
            // Measured best of 0.01, 0.02 and 0.05 for the MLP on Fashion-MNIST, 10 clients,
            // IID and Dirichlet(0.5) (docs/bench-training.md).
            lr: 0.02,
            optimizer: "sgd".into(),
            momentum: 0.9,
            local_tol: 0.0,
            seed: 0,
            data_dir: None,
            out: PathBuf::from("runs/latest"),
            backend: "flex".into(),
            client_fraction: 1.0,
            quorum: None,
            round_timeout_secs: coordinator.round_timeout_secs,
            join_timeout_secs: 120.0,
            heartbeat_timeout_secs: coordinator.heartbeat_timeout_secs,
            assignment: "all".into(),
            aggregation: "mean".into(),
            server_lr: 1.0,
            server_momentum: 0.0,
            top_k: 1.0,
            quantization: "none".into(),
            max_shard_elems: coordinator.max_shard_elems,
            chunk_bytes: coordinator.chunk_bytes,
            tol: 0.0,
            patience: 3,
            target_accuracy: None,
            token: String::new(),
            target_sparsity: None,
            target_params: None,
            prune_schedule: "gradual".into(),
            prune_initial: 0.0,
            prune_start: 2,
            prune_every: 1,
            prune_steps: 5,
            prune_scope: "global".into(),
            prune_biases: false,
            structure: None,
        }
    }
}

/// The model a run trains.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelChoice {
    Burn(ModelKind),
    /// Named tensors of a synthetic least-squares workload.
    Synthetic(Vec<TensorSpec>),
}

impl ModelChoice {
    pub fn parse(text: &str) -> Result<Self, UsageError> {
        if let Some(spec) = text.strip_prefix("synthetic:") {
            return parse_synthetic(spec).map(Self::Synthetic);
        }
        text.parse::<ModelKind>().map(Self::Burn).map_err(|_| {
            UsageError(format!(
                "invalid --model `{text}`: expected `mlp`, `cnn` or `synthetic:NAME=DxD,...`"
            ))
        })
    }

    pub fn kind_name(&self) -> String {
        match self {
            Self::Burn(kind) => kind.to_string(),
            Self::Synthetic(_) => "synthetic".into(),
        }
    }

    pub fn tensors(&self) -> Vec<TensorSpec> {
        match self {
            Self::Burn(kind) => kind
                .tensor_specs()
                .into_iter()
                .map(|spec| TensorSpec::new(spec.name, spec.shape))
                .collect(),
            Self::Synthetic(tensors) => tensors.clone(),
        }
    }

    /// Initial parameters: burn's seeded initialization, or zeros for the synthetic workload.
    pub fn initial_params(&self, seed: u64) -> Vec<f32> {
        match self {
            Self::Burn(kind) => kind.init_params(seed),
            Self::Synthetic(tensors) => vec![0.0; tensors.iter().map(TensorSpec::numel).sum()],
        }
    }
}

/// Parses `NAME=DxD,...`; a dimension list of `scalar` (or nothing) is a scalar.
fn parse_synthetic(spec: &str) -> Result<Vec<TensorSpec>, UsageError> {
    let invalid = |part: &str| {
        UsageError(format!(
            "invalid synthetic tensor `{part}`: expected NAME=DxD (for example w=1024x1024) or NAME=scalar"
        ))
    };
    spec.split(',')
        .map(|part| {
            let (name, dims) = part.split_once('=').ok_or_else(|| invalid(part))?;
            if name.is_empty() {
                return Err(invalid(part));
            }
            let shape = if dims.is_empty() || dims == "scalar" {
                Vec::new()
            } else {
                dims.split('x')
                    .map(|d| d.parse::<usize>().ok().filter(|&d| d > 0))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| invalid(part))?
            };
            Ok(TensorSpec::new(name, shape))
        })
        .collect()
}

impl RunConfig {
    /// Reads a TOML file; unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self, UsageError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            UsageError(format!(
                "failed to read config file {}: {e}",
                path.display()
            ))
        })?;
        toml::from_str(&text)
            .map_err(|e| UsageError(format!("invalid config file {}: {e}", path.display())))
    }

    pub fn model(&self) -> Result<ModelChoice, UsageError> {
        ModelChoice::parse(&self.model)
    }

    pub fn partition(&self) -> Result<Partition, UsageError> {
        self.partition
            .parse()
            .map_err(|e: fedcompress_model::ModelError| UsageError(e.to_string()))
    }

    /// Returns the coordinator's part of the settings, validated.
    pub fn coordinator_config(&self) -> Result<CoordinatorConfig, UsageError> {
        let parse_error = |key: &str, value: &str, error: String| {
            UsageError(format!("invalid setting `{key}` = {value}: {error}"))
        };
        let assignment: AssignmentPolicy =
            self.assignment
                .parse()
                .map_err(|e: fedcompress_core::AssignmentError| {
                    parse_error("assignment", &self.assignment, e.to_string())
                })?;
        let aggregation: AggregationRule = self
            .aggregation
            .parse()
            .map_err(|e| parse_error("aggregation", &self.aggregation, e))?;
        let quantization: Quantization = self
            .quantization
            .parse()
            .map_err(|e| parse_error("quantization", &self.quantization, e))?;
        if self.workers == 0 {
            return Err(UsageError(
                "invalid setting `workers` = 0: a run needs at least one worker".into(),
            ));
        }
        if self.workers > self.clients {
            return Err(UsageError(format!(
                "invalid setting `workers` = {}: more workers than the {} clients; lower --workers or raise --clients",
                self.workers, self.clients
            )));
        }
        let server_step = if self.server_momentum > 0.0 {
            ServerStep::Momentum {
                lr: self.server_lr,
                beta: self.server_momentum,
            }
        } else {
            ServerStep::Plain { lr: self.server_lr }
        };
        let config = CoordinatorConfig {
            clients: self.clients,
            client_fraction: self.client_fraction,
            rounds: self.rounds,
            quorum: self.quorum,
            round_timeout_secs: self.round_timeout_secs,
            join_timeout_secs: self.join_timeout_secs,
            heartbeat_timeout_secs: self.heartbeat_timeout_secs,
            assignment,
            aggregation,
            server_step,
            max_shard_elems: self.max_shard_elems,
            chunk_bytes: self.chunk_bytes,
            seed: self.seed,
            token: self.token.clone(),
            local: LocalConfig {
                epochs: self.local_epochs,
                lr: self.lr,
                batch_size: self.batch_size,
                optimizer: self.optimizer.clone(),
                momentum: self.momentum,
                local_tol: self.local_tol,
            },
            compression: CompressionConfig {
                top_k: self.top_k,
                quantization,
            },
            tol: self.tol,
            patience: self.patience,
            target_accuracy: self.target_accuracy,
            ..CoordinatorConfig::default()
        };
        config.validate().map_err(|e| UsageError(e.to_string()))?;
        Ok(config)
    }
}

/// The parts of a pruning setup the outputs need again after the run.
#[derive(Clone, Debug)]
pub struct PruneSetup {
    pub pruner: Arc<SchedulePruner>,
    /// Units groups of structured pruning, for the compact export.
    pub groups: Option<Vec<StructuredGroup>>,
}

impl RunConfig {
    /// Builds the pruner of the run, or `None` when no target is set.
    pub fn prune_setup(&self, model: &ModelChoice) -> Result<Option<PruneSetup>, UsageError> {
        let usage = |key: &str, value: &dyn std::fmt::Display, reason: &str| {
            UsageError(format!("invalid setting `{key}` = {value}: {reason}"))
        };
        let layout = ShardLayout::new(model.tensors(), self.max_shard_elems)
            .map_err(|e| UsageError(e.to_string()))?;
        let target = match (self.target_sparsity, self.target_params) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(UsageError(
                    "invalid settings: give either `target_sparsity` or `target_params`, not both"
                        .into(),
                ));
            }
            (Some(sparsity), None) => PruneTarget::Sparsity(sparsity),
            (None, Some(params)) => PruneTarget::Params(params),
        };

        let groups = match &self.structure {
            None => None,
            Some(text) => {
                let structure: Structure = text
                    .parse()
                    .map_err(|e: String| usage("structure", text, &e))?;
                if matches!(target, PruneTarget::Params(_)) {
                    return Err(usage(
                        "target_params",
                        &self.target_params.unwrap_or_default(),
                        "structured pruning takes `target_sparsity` (the fraction of units removed)",
                    ));
                }
                Some(structured_groups(model, structure).ok_or_else(|| {
                    usage(
                        "structure",
                        text,
                        &format!(
                            "the `{}` model supports {}",
                            model.kind_name(),
                            match model {
                                ModelChoice::Burn(ModelKind::Mlp) => "only `neurons`",
                                ModelChoice::Burn(ModelKind::Cnn) => "only `channels`",
                                ModelChoice::Synthetic(_) => "no structured pruning",
                            }
                        ),
                    )
                })?)
            }
        };

        let prunable = prune::prunable_count(&layout, self.prune_biases);
        let sparsity = target
            .to_sparsity(prunable)
            .map_err(|e| UsageError(e.to_string()))?;
        let schedule = match self.prune_schedule.as_str() {
            "gradual" => PruneSchedule::Gradual {
                initial: self.prune_initial,
                target: sparsity,
                start_round: self.prune_start,
                every: self.prune_every,
                steps: self.prune_steps,
            },
            "one_shot" => PruneSchedule::OneShot {
                target: sparsity,
                round: self.prune_start,
            },
            other => {
                return Err(usage(
                    "prune_schedule",
                    &other,
                    "expected `gradual` or `one_shot`",
                ));
            }
        };
        schedule.validate().map_err(|e| UsageError(e.to_string()))?;
        if schedule.last_round() > self.rounds {
            return Err(usage(
                "prune_steps",
                &self.prune_steps,
                &format!(
                    "the schedule's last pruning round {} is after the last round {}; raise --rounds or lower --prune-steps, --prune-every or --prune-start",
                    schedule.last_round(),
                    self.rounds
                ),
            ));
        }
        let scope: PruneScope = self
            .prune_scope
            .parse()
            .map_err(|e: String| usage("prune_scope", &self.prune_scope, &e))?;
        let mode = match &groups {
            Some(groups) => PruneMode::Structured(groups.clone()),
            None => PruneMode::Magnitude {
                scope,
                prune_biases: self.prune_biases,
            },
        };
        Ok(Some(PruneSetup {
            pruner: Arc::new(SchedulePruner {
                layout,
                schedule,
                mode,
            }),
            groups,
        }))
    }
}

/// Units that structured pruning may remove: hidden neurons of the MLP, convolution
/// channels of the CNN. Tensor indices follow `ModelKind::tensor_specs`.
fn structured_groups(model: &ModelChoice, structure: Structure) -> Option<Vec<StructuredGroup>> {
    let group = |out_weight, next_weight, next_in_per_unit| StructuredGroup {
        out_weight,
        out_bias: Some(out_weight + 1),
        next_weight,
        next_in_per_unit,
    };
    match (model, structure) {
        // fc1 -> fc2 and fc2 -> fc3, one input column per neuron.
        (ModelChoice::Burn(ModelKind::Mlp), Structure::Neurons) => {
            Some(vec![group(0, 2, 1), group(2, 4, 1)])
        }
        // conv1 -> conv2 (5x5 kernel per input channel), conv2 -> fc1 (7x7 map per channel).
        (ModelChoice::Burn(ModelKind::Cnn), Structure::Channels) => {
            Some(vec![group(0, 2, 25), group(2, 4, 49)])
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_spec_parses_shapes() {
        let ModelChoice::Synthetic(tensors) =
            ModelChoice::parse("synthetic:w=3x4,s=scalar,b=5").unwrap()
        else {
            panic!("expected a synthetic model");
        };
        assert_eq!(tensors[0].shape, vec![3, 4]);
        assert!(tensors[1].shape.is_empty());
        assert_eq!(tensors[2].numel(), 5);
        assert!(ModelChoice::parse("synthetic:w=3xq").is_err());
        assert!(ModelChoice::parse("resnet").is_err());
    }

    #[test]
    fn config_file_rejects_unknown_keys() {
        let error = toml::from_str::<RunConfig>("modle = \"mlp\"").unwrap_err();
        assert!(error.to_string().contains("modle"));
    }

    #[test]
    fn more_workers_than_clients_is_rejected() {
        let config = RunConfig {
            workers: 5,
            clients: 3,
            ..RunConfig::default()
        };
        let error = config.coordinator_config().unwrap_err();
        assert!(error.0.contains("workers"), "{}", error.0);
    }
}
