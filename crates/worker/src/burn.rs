//! The local update of the burn models on an IDX data set.

use std::sync::Arc;

use fedcompress_core::{ClientId, Mask, TensorSpec};
use fedcompress_model::{
    Backend, Dataset, LocalTrainConfig, ModelKind, OptimizerKind, train_local,
};
use tracing::debug;

use crate::update::{LocalSettings, LocalUpdate};

/// Clients of one worker, each with its partition of a shared training set.
pub struct BurnUpdate {
    kind: ModelKind,
    backend: Backend,
    data: Arc<Dataset>,
    /// Client id and the indices of its samples in `data`.
    partitions: Vec<(ClientId, Vec<usize>)>,
}

impl BurnUpdate {
    pub fn new(
        kind: ModelKind,
        backend: Backend,
        data: Arc<Dataset>,
        partitions: Vec<(ClientId, Vec<usize>)>,
    ) -> Self {
        Self {
            kind,
            backend,
            data,
            partitions,
        }
    }
}

impl LocalUpdate for BurnUpdate {
    fn clients(&self) -> Vec<(ClientId, u64)> {
        self.partitions
            .iter()
            .map(|(client, indices)| (*client, indices.len() as u64))
            .collect()
    }

    fn check_model(&self, kind: &str, tensors: &[TensorSpec]) -> anyhow::Result<()> {
        anyhow::ensure!(
            kind == self.kind.to_string(),
            "invalid model: the coordinator trains `{kind}`, this worker was started with --model {}",
            self.kind
        );
        let expected = self.kind.tensor_specs();
        let same = expected.len() == tensors.len()
            && expected
                .iter()
                .zip(tensors)
                .all(|(a, b)| a.name == b.name && a.shape == b.shape);
        anyhow::ensure!(
            same,
            "invalid model: the coordinator's `{kind}` tensors differ from this build's"
        );
        Ok(())
    }

    fn train(
        &self,
        client: ClientId,
        params: &[f32],
        mask: &Mask,
        settings: &LocalSettings,
    ) -> anyhow::Result<Vec<f32>> {
        let indices = &self
            .partitions
            .iter()
            .find(|(c, _)| *c == client)
            .ok_or_else(|| anyhow::anyhow!("client {client} is not hosted by this worker"))?
            .1;
        let optimizer = match settings.optimizer.as_str() {
            "adam" => OptimizerKind::Adam,
            _ => OptimizerKind::Sgd {
                momentum: settings.momentum,
            },
        };
        let config = LocalTrainConfig {
            optimizer,
            lr: settings.lr,
            batch_size: settings.batch_size as usize,
            epochs: settings.epochs as usize,
            local_tol: settings.local_tol,
            seed: settings.seed ^ u64::from(client).wrapping_mul(0x2545_F491_4F6C_DD1D),
            backend: self.backend,
        };
        let keep = (mask.count_kept() < mask.len()).then(|| mask.to_bools());
        let result = train_local(
            self.kind,
            params,
            keep.as_deref(),
            &self.data,
            indices,
            &config,
            &mut |epoch, loss| {
                debug!(
                    client_id = client,
                    round = settings.round,
                    epoch,
                    loss,
                    "local epoch done"
                )
            },
        )?;
        debug!(
            client_id = client,
            round = settings.round,
            epochs = result.epochs_run,
            loss = result.mean_loss,
            stopped_early = result.stopped_early,
            "local update done"
        );
        Ok(result.params)
    }
}
