//! Pruning: the schedule of pruning rounds, magnitude pruning of single parameters, and
//! structured pruning of whole neurons or channels. Every function here only shrinks a mask:
//! a parameter that is pruned stays pruned.

mod magnitude;
mod schedule;
mod structured;

pub use magnitude::{
    PruneScope, is_prunable, kept_for_sparsity, magnitude_mask, prunable_count, prunable_sparsity,
};
pub use schedule::{PruneSchedule, PruneTarget};
pub use structured::{Compaction, Structure, StructuredGroup, kept_units, structured_mask};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PruneError {
    #[error("invalid setting `{key}` = {value}: {reason}")]
    InvalidSetting {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid structured group {group}: {reason}")]
    InvalidGroup { group: usize, reason: String },
    #[error("invalid kept units of structured group {group}: {reason}")]
    InvalidKeptUnits { group: usize, reason: String },
}

fn invalid(key: &'static str, value: impl ToString, reason: impl Into<String>) -> PruneError {
    PruneError::InvalidSetting {
        key,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Checks that `value` is a sparsity in [0, 1), because pruning every parameter is no target.
fn check_sparsity(key: &'static str, value: f64) -> Result<(), PruneError> {
    if (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            key,
            value,
            "must be a sparsity in [0, 1), the fraction of parameters pruned",
        ))
    }
}

/// Ranking key of a parameter or unit by magnitude: NaN ranks below every number, so it is
/// pruned before any finite value.
fn rank_magnitude(magnitude: f64) -> f64 {
    if magnitude.is_nan() { -1.0 } else { magnitude }
}

/// Orders `(magnitude, index)` pairs from the most to the least worth keeping: larger
/// magnitude first, and the lower index first among equal magnitudes.
fn keep_order(a: &(f64, usize), b: &(f64, usize)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}
