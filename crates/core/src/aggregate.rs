//! Aggregation of client updates, one shard at a time, and the server step that applies
//! the aggregate to the global model.
//!
//! Sums run in f64 over the updates in ascending client id order, so the result does not
//! depend on the order in which uploads arrived, and a rerun with the same inputs gives the
//! same bits.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ClientId;

/// One client's update of one shard, dense over the shard.
#[derive(Clone, Copy, Debug)]
pub struct WeightedUpdate<'a> {
    pub client: ClientId,
    /// Sample count of the client.
    pub weight: u64,
    pub delta: &'a [f32],
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AggregateError {
    #[error("no updates to aggregate")]
    NoUpdates,
    #[error("total sample weight of the round is zero: no client reported any samples")]
    ZeroWeight,
    #[error("update of client {client} has {got} values, the shard has {expected}")]
    LengthMismatch {
        client: ClientId,
        got: usize,
        expected: usize,
    },
    #[error("update of client {client} holds a non-finite value at position {position}")]
    NonFinite { client: ClientId, position: usize },
    #[error("server step would make parameter {position} non-finite; the shard was left unchanged")]
    NonFiniteResult { position: usize },
}

/// Rule that combines the updates of one shard into one.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum AggregationRule {
    /// Sample-weighted mean (FedAvg).
    Mean,
    /// Coordinate-wise median, unweighted: robust to a minority of outliers.
    Median,
    /// Coordinate-wise mean after dropping this fraction of the largest and of the smallest values.
    TrimmedMean(f64),
}

impl FromStr for AggregationRule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || {
            format!(
                "invalid aggregation `{text}`: expected `mean`, `median` or `trimmed:F` with 0 <= F < 0.5"
            )
        };
        match text.trim() {
            "mean" => Ok(Self::Mean),
            "median" => Ok(Self::Median),
            other => other
                .strip_prefix("trimmed:")
                .and_then(|f| f.parse::<f64>().ok())
                .filter(|f| (0.0..0.5).contains(f))
                .map(Self::TrimmedMean)
                .ok_or_else(error),
        }
    }
}

impl TryFrom<String> for AggregationRule {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<AggregationRule> for String {
    fn from(rule: AggregationRule) -> Self {
        rule.to_string()
    }
}

impl fmt::Display for AggregationRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mean => write!(f, "mean"),
            Self::Median => write!(f, "median"),
            Self::TrimmedMean(fraction) => write!(f, "trimmed:{fraction}"),
        }
    }
}

/// Combines the updates of one shard of `len` elements into one f64 update.
pub fn aggregate_shard(
    rule: AggregationRule,
    updates: &[WeightedUpdate<'_>],
    len: usize,
) -> Result<Vec<f64>, AggregateError> {
    if updates.is_empty() {
        return Err(AggregateError::NoUpdates);
    }
    for update in updates {
        if update.delta.len() != len {
            return Err(AggregateError::LengthMismatch {
                client: update.client,
                got: update.delta.len(),
                expected: len,
            });
        }
        if let Some(position) = update.delta.iter().position(|v| !v.is_finite()) {
            return Err(AggregateError::NonFinite {
                client: update.client,
                position,
            });
        }
    }
    let mut ordered: Vec<WeightedUpdate<'_>> = updates.to_vec();
    ordered.sort_by_key(|u| u.client);

    match rule {
        AggregationRule::Mean => weighted_mean(&ordered, len),
        AggregationRule::Median => Ok(coordinate_wise(&ordered, len, |values| {
            let n = values.len();
            if n % 2 == 1 {
                values[n / 2]
            } else {
                (values[n / 2 - 1] + values[n / 2]) / 2.0
            }
        })),
        AggregationRule::TrimmedMean(fraction) => Ok(coordinate_wise(&ordered, len, |values| {
            let n = values.len();
            let cut = ((n as f64 * fraction).floor() as usize).min((n - 1) / 2);
            let kept = &values[cut..n - cut];
            kept.iter().sum::<f64>() / kept.len() as f64
        })),
    }
}

fn weighted_mean(updates: &[WeightedUpdate<'_>], len: usize) -> Result<Vec<f64>, AggregateError> {
    let total: u64 = updates.iter().map(|u| u.weight).sum();
    if total == 0 {
        return Err(AggregateError::ZeroWeight);
    }
    let mut sum = vec![0.0f64; len];
    for update in updates {
        let weight = update.weight as f64;
        for (acc, &value) in sum.iter_mut().zip(update.delta) {
            *acc += weight * value as f64;
        }
    }
    let total = total as f64;
    for acc in &mut sum {
        *acc /= total;
    }
    Ok(sum)
}

fn coordinate_wise(
    updates: &[WeightedUpdate<'_>],
    len: usize,
    reduce: impl Fn(&[f64]) -> f64,
) -> Vec<f64> {
    let mut column = vec![0.0f64; updates.len()];
    (0..len)
        .map(|i| {
            for (slot, update) in column.iter_mut().zip(updates) {
                *slot = update.delta[i] as f64;
            }
            column.sort_by(f64::total_cmp);
            reduce(&column)
        })
        .collect()
}

/// The server optimizer: how an aggregated update moves the global model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ServerStep {
    /// θ ← θ + lr·Δ; with lr = 1 this is plain FedAvg.
    Plain { lr: f64 },
    /// FedAvgM: v ← β·v + Δ, θ ← θ + lr·v.
    Momentum { lr: f64, beta: f64 },
    /// FedAdam (Reddi et al. 2021) with the aggregate as the pseudo-gradient.
    Adam {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
    },
}

impl Default for ServerStep {
    fn default() -> Self {
        Self::Plain { lr: 1.0 }
    }
}

/// Per-parameter state of the server optimizer, over the whole flat parameter vector.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerState {
    /// First moment (FedAvgM velocity or Adam m); empty until first used.
    pub first: Vec<f32>,
    /// Second moment of Adam; empty until first used.
    pub second: Vec<f32>,
}

impl ServerStep {
    /// Applies `update` to `params`, the slice of the global model starting at `start`.
    /// Leaves `params` and `state` unchanged and returns an error when any result would be
    /// non-finite.
    pub fn apply(
        &self,
        params: &mut [f32],
        start: usize,
        update: &[f64],
        state: &mut ServerState,
        total_len: usize,
    ) -> Result<(), AggregateError> {
        assert_eq!(params.len(), update.len(), "shard and update lengths match");
        let mut next = vec![0.0f32; params.len()];
        let mut first = Vec::new();
        let mut second = Vec::new();
        match *self {
            Self::Plain { lr } => {
                for ((out, &p), &u) in next.iter_mut().zip(params.iter()).zip(update) {
                    *out = (p as f64 + lr * u) as f32;
                }
            }
            Self::Momentum { lr, beta } => {
                ensure_len(&mut state.first, total_len);
                let old = &state.first[start..start + params.len()];
                first = old
                    .iter()
                    .zip(update)
                    .map(|(&v, &u)| (beta * v as f64 + u) as f32)
                    .collect();
                for ((out, &p), &v) in next.iter_mut().zip(params.iter()).zip(&first) {
                    *out = (p as f64 + lr * v as f64) as f32;
                }
            }
            Self::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                ensure_len(&mut state.first, total_len);
                ensure_len(&mut state.second, total_len);
                let range = start..start + params.len();
                first = state.first[range.clone()]
                    .iter()
                    .zip(update)
                    .map(|(&m, &u)| (beta1 * m as f64 + (1.0 - beta1) * u) as f32)
                    .collect();
                second = state.second[range]
                    .iter()
                    .zip(update)
                    .map(|(&v, &u)| (beta2 * v as f64 + (1.0 - beta2) * u * u) as f32)
                    .collect();
                for (k, out) in next.iter_mut().enumerate() {
                    let step = lr * first[k] as f64 / ((second[k] as f64).sqrt() + eps);
                    *out = (params[k] as f64 + step) as f32;
                }
            }
        }

        let bad = next
            .iter()
            .chain(&first)
            .chain(&second)
            .position(|v| !v.is_finite());
        if let Some(position) = bad {
            return Err(AggregateError::NonFiniteResult {
                position: position % params.len().max(1),
            });
        }
        params.copy_from_slice(&next);
        if !first.is_empty() {
            state.first[start..start + params.len()].copy_from_slice(&first);
        }
        if !second.is_empty() {
            state.second[start..start + params.len()].copy_from_slice(&second);
        }
        Ok(())
    }
}

fn ensure_len(values: &mut Vec<f32>, len: usize) {
    if values.len() != len {
        *values = vec![0.0; len];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(client: ClientId, weight: u64, delta: &[f32]) -> WeightedUpdate<'_> {
        WeightedUpdate {
            client,
            weight,
            delta,
        }
    }

    #[test]
    fn aggregate_weighted_mean_exact() {
        let a = [1.0, 2.0, 0.0];
        let b = [4.0, -2.0, 3.0];
        let mean = aggregate_shard(
            AggregationRule::Mean,
            &[update(1, 3, &a), update(0, 1, &b)],
            3,
        )
        .unwrap();
        assert_eq!(mean, vec![7.0 / 4.0, 4.0 / 4.0, 3.0 / 4.0]);
    }

    #[test]
    fn aggregate_is_independent_of_arrival_order() {
        let a = [0.1f32, 1e7, -3.3];
        let b = [1e-3f32, 0.7, 2.2];
        let c = [5.5f32, -1e7, 0.01];
        let forward = [update(0, 7, &a), update(1, 11, &b), update(2, 13, &c)];
        let backward = [update(2, 13, &c), update(0, 7, &a), update(1, 11, &b)];
        let x = aggregate_shard(AggregationRule::Mean, &forward, 3).unwrap();
        let y = aggregate_shard(AggregationRule::Mean, &backward, 3).unwrap();
        assert_eq!(x, y);
    }

    #[test]
    fn aggregate_rejects_bad_updates() {
        let good = [1.0f32, 2.0];
        let short = [1.0f32];
        let nan = [1.0f32, f32::NAN];
        let rule = AggregationRule::Mean;
        assert_eq!(
            aggregate_shard(rule, &[], 2),
            Err(AggregateError::NoUpdates)
        );
        assert_eq!(
            aggregate_shard(rule, &[update(0, 0, &good)], 2),
            Err(AggregateError::ZeroWeight)
        );
        assert!(matches!(
            aggregate_shard(rule, &[update(3, 1, &short)], 2),
            Err(AggregateError::LengthMismatch { client: 3, .. })
        ));
        assert!(matches!(
            aggregate_shard(rule, &[update(4, 1, &nan)], 2),
            Err(AggregateError::NonFinite {
                client: 4,
                position: 1
            })
        ));
    }

    #[test]
    fn aggregate_median_ignores_outlier() {
        let a = [1.0f32];
        let b = [2.0f32];
        let c = [1e30f32];
        let updates = [update(0, 1, &a), update(1, 1, &b), update(2, 1, &c)];
        let median = aggregate_shard(AggregationRule::Median, &updates, 1).unwrap();
        assert_eq!(median, vec![2.0]);
        let trimmed = aggregate_shard(AggregationRule::TrimmedMean(0.34), &updates, 1).unwrap();
        assert_eq!(trimmed, vec![2.0]);
    }

    #[test]
    fn aggregate_rule_parses() {
        assert_eq!("mean".parse(), Ok(AggregationRule::Mean));
        assert_eq!("trimmed:0.1".parse(), Ok(AggregationRule::TrimmedMean(0.1)));
        assert!("trimmed:0.5".parse::<AggregationRule>().is_err());
        assert!("avg".parse::<AggregationRule>().is_err());
    }

    #[test]
    fn server_step_plain_and_momentum() {
        let mut state = ServerState::default();
        let mut params = [1.0f32, 2.0];
        ServerStep::Plain { lr: 1.0 }
            .apply(&mut params, 0, &[0.5, -1.0], &mut state, 2)
            .unwrap();
        assert_eq!(params, [1.5, 1.0]);

        let step = ServerStep::Momentum { lr: 1.0, beta: 0.5 };
        step.apply(&mut params, 0, &[1.0, 1.0], &mut state, 2)
            .unwrap();
        step.apply(&mut params, 0, &[1.0, 1.0], &mut state, 2)
            .unwrap();
        assert_eq!(params, [1.5 + 1.0 + 1.5, 1.0 + 1.0 + 1.5]);
    }

    #[test]
    fn server_step_keeps_params_finite() {
        let steps = [
            ServerStep::Plain { lr: 1.0 },
            ServerStep::Momentum { lr: 1.0, beta: 0.9 },
            ServerStep::Adam {
                lr: 1e38,
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
            },
        ];
        for step in steps {
            let mut state = ServerState::default();
            let mut params = [f32::MAX, 1.0];
            let result = step.apply(&mut params, 0, &[1e300, 1e300], &mut state, 2);
            assert!(
                matches!(result, Err(AggregateError::NonFiniteResult { .. })),
                "{step:?}"
            );
            assert_eq!(params, [f32::MAX, 1.0], "{step:?} changed the model");
        }
    }
}
