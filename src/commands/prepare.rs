//! Turning settings into a model, data and an evaluator, shared by `run` and `coordinator`.

use std::collections::BTreeMap;
use std::sync::Arc;

use fedcompress_coordinator::evaluate::TestSetEvaluator;
use fedcompress_coordinator::{Evaluator, ModelSetup, Pruner, RoundSummary, RunHooks};
use fedcompress_model::{Backend, load_data, partition};
use tokio::sync::mpsc;
use tracing::info;

use crate::UsageError;
use crate::settings::{ModelChoice, PruneSetup, RunConfig};

pub struct Prepared {
    pub model: ModelChoice,
    pub setup: ModelSetup,
    pub evaluator: Option<Arc<dyn Evaluator>>,
    /// Description of the data the run uses, for logs and the report.
    pub data: Option<String>,
    /// Training samples per client, when the coordinator's side can compute them.
    pub client_samples: BTreeMap<u32, u64>,
    pub prune: Option<PruneSetup>,
}

impl Prepared {
    /// Returns the run hooks for the evaluator, the pruner and the round `events` channel.
    pub fn hooks(&self, events: mpsc::UnboundedSender<RoundSummary>) -> RunHooks {
        RunHooks {
            evaluator: self.evaluator.clone(),
            pruner: self
                .prune
                .as_ref()
                .map(|p| p.pruner.clone() as Arc<dyn Pruner>),
            events: Some(events),
            ..RunHooks::default()
        }
    }
}

/// Checks the settings and loads what the coordinator needs. Every failure here is bad
/// input: a [`UsageError`].
pub fn prepare(config: &RunConfig) -> Result<Prepared, UsageError> {
    let model = config.model()?;
    let prune = config.prune_setup(&model)?;
    let setup = ModelSetup {
        kind: model.kind_name(),
        tensors: model.tensors(),
        initial: model.initial_params(config.seed),
    };
    let ModelChoice::Burn(kind) = model else {
        return Ok(Prepared {
            model,
            setup,
            evaluator: None,
            data: None,
            client_samples: BTreeMap::new(),
            prune,
        });
    };

    let backend: Backend = config
        .backend
        .parse()
        .map_err(|e: fedcompress_model::ModelError| UsageError(e.to_string()))?;
    backend
        .ensure_available()
        .map_err(|e| UsageError(e.to_string()))?;
    let scheme = config.partition()?;
    let (source, train, test) =
        load_data(config.data_dir.as_deref()).map_err(|e| UsageError(e.to_string()))?;
    info!(data = %source.description, "data loaded");
    let parts = partition(&train.labels, config.clients, &scheme, config.seed)
        .map_err(|e| UsageError(e.to_string()))?;
    let client_samples = parts
        .iter()
        .enumerate()
        .map(|(client, indices)| (client as u32, indices.len() as u64))
        .collect();
    Ok(Prepared {
        model,
        setup,
        evaluator: Some(Arc::new(TestSetEvaluator {
            kind,
            backend,
            test,
        })),
        data: Some(source.description),
        client_samples,
        prune,
    })
}
