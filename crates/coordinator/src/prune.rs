//! The coordinator's pruner: a schedule of target sparsities applied by magnitude, per
//! parameter or per whole neuron or channel.

use fedcompress_core::prune::{PruneScope, StructuredGroup, magnitude_mask, structured_mask};
use fedcompress_core::{Mask, PruneSchedule, ShardLayout};
use tracing::{error, info};

use crate::engine::Pruner;

/// Unit that a pruning step removes.
#[derive(Clone, Debug)]
pub enum PruneMode {
    /// Single parameters by magnitude.
    Magnitude {
        scope: PruneScope,
        prune_biases: bool,
    },
    /// Whole units (neurons or channels) by the L2 norm of their weights.
    Structured(Vec<StructuredGroup>),
}

#[derive(Debug)]
pub struct SchedulePruner {
    pub layout: ShardLayout,
    pub schedule: PruneSchedule,
    pub mode: PruneMode,
}

impl Pruner for SchedulePruner {
    fn prune(&self, round: u64, params: &[f32], mask: &Mask) -> Option<Mask> {
        let target = self.schedule.target_at(round)?;
        let new_mask = match &self.mode {
            PruneMode::Magnitude {
                scope,
                prune_biases,
            } => magnitude_mask(params, &self.layout, mask, target, *scope, *prune_biases),
            PruneMode::Structured(groups) => {
                match structured_mask(params, &self.layout, mask, groups, target) {
                    Ok((mask, _)) => mask,
                    Err(error) => {
                        error!(round, %error, "structured pruning failed; the mask is unchanged");
                        return None;
                    }
                }
            }
        };
        info!(
            round,
            target,
            kept = new_mask.count_kept(),
            sparsity = new_mask.sparsity(),
            "pruned the model"
        );
        Some(new_mask)
    }

    fn schedule_done(&self, round: u64) -> bool {
        self.schedule.done_after(round)
    }
}
