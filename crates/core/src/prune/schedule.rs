//! When to prune and how far: the gradual cubic schedule, one-shot pruning, and targets
//! given as a parameter count.

use serde::{Deserialize, Serialize};

use super::{PruneError, check_sparsity, invalid};

/// The rounds on which the coordinator prunes, and the sparsity each of them reaches.
/// Sparsities count the prunable parameters only.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PruneSchedule {
    /// Gradual pruning on the cubic schedule of Zhu and Gupta, "To prune, or not to prune"
    /// (arXiv:1710.01878, 2017),
    /// s_t = s_f + (s_i − s_f)(1 − (t − t_0)/(n·Δt))³, with n = `steps`, Δt = `every` and
    /// t − t_0 = (k + 1)·`every` at step k. Step k (k = 0 .. steps − 1) runs at round
    /// `start_round + k·every` and reaches `target + (initial − target)(1 − (k + 1)/steps)³`,
    /// so the first step already prunes past `initial` and the last reaches `target` exactly.
    Gradual {
        initial: f64,
        target: f64,
        start_round: u64,
        every: u64,
        steps: u64,
    },
    /// A single pruning step to `target` at `round`.
    OneShot { target: f64, round: u64 },
}

impl PruneSchedule {
    /// Checks every field; the error names the key and the bad value.
    pub fn validate(&self) -> Result<(), PruneError> {
        match *self {
            Self::Gradual {
                initial,
                target,
                start_round,
                every,
                steps,
            } => {
                check_sparsity("initial", initial)?;
                check_sparsity("target", target)?;
                if initial > target {
                    return Err(invalid(
                        "initial",
                        initial,
                        format!("must not exceed target {target}, because sparsity only grows"),
                    ));
                }
                if every == 0 {
                    return Err(invalid("every", 0, "must be at least 1 round"));
                }
                if steps == 0 {
                    return Err(invalid("steps", 0, "must be at least 1"));
                }
                let last_round = (steps - 1)
                    .checked_mul(every)
                    .and_then(|span| start_round.checked_add(span));
                if last_round.is_none() {
                    return Err(invalid(
                        "steps",
                        steps,
                        "the last pruning round overflows u64; lower steps, every or start_round",
                    ));
                }
                Ok(())
            }
            Self::OneShot { target, .. } => check_sparsity("target", target),
        }
    }

    /// Returns the sparsity to prune to on `round`, or `None` when `round` is not a pruning
    /// round.
    pub fn target_at(&self, round: u64) -> Option<f64> {
        match *self {
            Self::Gradual {
                initial,
                target,
                start_round,
                every,
                steps,
            } => {
                let since_start = round.checked_sub(start_round)?;
                if every == 0 || since_start % every != 0 {
                    return None;
                }
                let step = since_start / every;
                if step >= steps {
                    return None;
                }
                let remaining = 1.0 - (step + 1) as f64 / steps as f64;
                Some(target + (initial - target) * remaining.powi(3))
            }
            Self::OneShot {
                target,
                round: prune_round,
            } => (round == prune_round).then_some(target),
        }
    }

    /// Returns the final sparsity of the schedule.
    pub fn target(&self) -> f64 {
        match *self {
            Self::Gradual { target, .. } | Self::OneShot { target, .. } => target,
        }
    }

    /// Returns the last round that prunes.
    pub fn last_round(&self) -> u64 {
        match *self {
            Self::Gradual {
                start_round,
                every,
                steps,
                ..
            } => start_round.saturating_add(steps.saturating_sub(1).saturating_mul(every)),
            Self::OneShot { round, .. } => round,
        }
    }

    /// Returns whether no pruning round follows `round`, so convergence may be checked
    /// after it.
    pub fn done_after(&self, round: u64) -> bool {
        round >= self.last_round()
    }
}

/// How far to prune: a sparsity, or the number of prunable parameters to keep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PruneTarget {
    /// Fraction of the prunable parameters pruned, in [0, 1).
    Sparsity(f64),
    /// Number of prunable parameters kept (`target_params`).
    Params(usize),
}

impl PruneTarget {
    /// Converts the target to a sparsity over `prunable` parameters.
    pub fn to_sparsity(self, prunable: usize) -> Result<f64, PruneError> {
        match self {
            Self::Sparsity(sparsity) => {
                check_sparsity("target", sparsity)?;
                Ok(sparsity)
            }
            Self::Params(0) => Err(invalid(
                "target_params",
                0,
                "must keep at least 1 parameter",
            )),
            Self::Params(kept) if kept > prunable => Err(invalid(
                "target_params",
                kept,
                format!(
                    "the model has only {prunable} prunable parameters; set at most {prunable}"
                ),
            )),
            Self::Params(kept) => Ok(1.0 - kept as f64 / prunable as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prune::kept_for_sparsity;

    fn gradual() -> PruneSchedule {
        PruneSchedule::Gradual {
            initial: 0.2,
            target: 0.9,
            start_round: 3,
            every: 2,
            steps: 4,
        }
    }

    fn assert_close(got: f64, expected: f64) {
        assert!(
            (got - expected).abs() < 1e-12,
            "got {got}, expected {expected}"
        );
    }

    fn invalid_key(error: PruneError) -> &'static str {
        match error {
            PruneError::InvalidSetting { key, .. } => key,
            other => panic!("expected an invalid setting, got {other:?}"),
        }
    }

    #[test]
    fn gradual_follows_cubic_at_each_step() {
        let schedule = gradual();
        schedule.validate().unwrap();

        for (step, round) in [(0u64, 3u64), (1, 5), (2, 7), (3, 9)] {
            let remaining: f64 = 1.0 - (step + 1) as f64 / 4.0;
            let expected = 0.9 + (0.2 - 0.9) * remaining.powi(3);
            assert_close(schedule.target_at(round).unwrap(), expected);
        }
        assert_close(schedule.target_at(3).unwrap(), 0.9 - 0.7 * 0.421875);
        assert_eq!(schedule.target_at(9), Some(0.9));
    }

    #[test]
    fn gradual_skips_other_rounds() {
        let schedule = gradual();
        for round in [0, 1, 2, 4, 6, 8, 10, 11, 100] {
            assert_eq!(schedule.target_at(round), None, "round {round}");
        }
    }

    #[test]
    fn gradual_sparsity_grows_each_step() {
        let schedule = PruneSchedule::Gradual {
            initial: 0.0,
            target: 0.95,
            start_round: 1,
            every: 1,
            steps: 10,
        };
        let targets: Vec<f64> = (1..=10).map(|r| schedule.target_at(r).unwrap()).collect();
        for pair in targets.windows(2) {
            assert!(pair[0] < pair[1], "{targets:?}");
        }
        assert_eq!(targets[9], 0.95);
    }

    #[test]
    fn gradual_single_step_reaches_target() {
        let schedule = PruneSchedule::Gradual {
            initial: 0.0,
            target: 0.5,
            start_round: 7,
            every: 3,
            steps: 1,
        };
        assert_eq!(schedule.target_at(7), Some(0.5));
        assert_eq!(schedule.target_at(10), None);
        assert_eq!(schedule.last_round(), 7);
    }

    #[test]
    fn gradual_last_round_and_done_after() {
        let schedule = gradual();
        assert_eq!(schedule.last_round(), 9);
        assert!(!schedule.done_after(0));
        assert!(!schedule.done_after(8));
        assert!(schedule.done_after(9));
        assert!(schedule.done_after(10));
    }

    #[test]
    fn one_shot_prunes_once() {
        let schedule = PruneSchedule::OneShot {
            target: 0.8,
            round: 5,
        };
        schedule.validate().unwrap();
        assert_eq!(schedule.target_at(5), Some(0.8));
        assert_eq!(schedule.target_at(4), None);
        assert_eq!(schedule.target_at(6), None);
        assert_eq!(schedule.last_round(), 5);
        assert!(!schedule.done_after(4));
        assert!(schedule.done_after(5));
        assert_eq!(schedule.target(), 0.8);
    }

    #[test]
    fn schedule_rejects_bad_settings() {
        let with = |initial: f64, target: f64, every: u64, steps: u64| PruneSchedule::Gradual {
            initial,
            target,
            start_round: 0,
            every,
            steps,
        };
        let cases = [
            (with(-0.1, 0.5, 1, 1), "initial"),
            (with(0.0, 1.0, 1, 1), "target"),
            (with(0.0, f64::NAN, 1, 1), "target"),
            (with(0.6, 0.5, 1, 1), "initial"),
            (with(0.0, 0.5, 0, 1), "every"),
            (with(0.0, 0.5, 1, 0), "steps"),
            (with(0.0, 0.5, u64::MAX, 3), "steps"),
            (
                PruneSchedule::OneShot {
                    target: 1.5,
                    round: 0,
                },
                "target",
            ),
        ];
        for (schedule, key) in cases {
            let error = schedule.validate().unwrap_err();
            let message = error.to_string();
            assert_eq!(invalid_key(error), key, "{schedule:?}");
            assert!(message.contains(&format!("`{key}`")), "{message}");
        }
        assert!(
            with(0.6, 0.5, 1, 1)
                .validate()
                .unwrap_err()
                .to_string()
                .contains("0.6")
        );
    }

    #[test]
    fn schedule_reads_from_json() {
        let schedule: PruneSchedule = serde_json::from_str(
            r#"{"kind": "gradual", "initial": 0.0, "target": 0.9,
                "start_round": 2, "every": 2, "steps": 5}"#,
        )
        .unwrap();
        assert_eq!(
            schedule,
            PruneSchedule::Gradual {
                initial: 0.0,
                target: 0.9,
                start_round: 2,
                every: 2,
                steps: 5
            }
        );
        let one_shot: PruneSchedule =
            serde_json::from_str(r#"{"kind": "one_shot", "target": 0.5, "round": 4}"#).unwrap();
        assert_eq!(
            one_shot,
            PruneSchedule::OneShot {
                target: 0.5,
                round: 4
            }
        );
        let typo = serde_json::from_str::<PruneSchedule>(
            r#"{"kind": "one_shot", "target": 0.5, "round": 4, "rounds": 5}"#,
        );
        assert!(typo.is_err());
    }

    #[test]
    fn target_params_converts_to_sparsity() {
        assert_eq!(PruneTarget::Params(250).to_sparsity(1000), Ok(0.75));
        assert_eq!(PruneTarget::Params(1000).to_sparsity(1000), Ok(0.0));
        assert_eq!(PruneTarget::Sparsity(0.3).to_sparsity(1000), Ok(0.3));

        // The sparsity converts back to exactly the requested count.
        let prunable = 1_663_370;
        for kept in [1, 2, 7, 1000, 166_337, 831_685, prunable - 1, prunable] {
            let sparsity = PruneTarget::Params(kept).to_sparsity(prunable).unwrap();
            assert_eq!(kept_for_sparsity(prunable, sparsity), kept, "kept {kept}");
        }
    }

    #[test]
    fn target_params_rejects_zero_and_excess() {
        let zero = PruneTarget::Params(0).to_sparsity(1000).unwrap_err();
        assert!(zero.to_string().contains("`target_params` = 0"), "{zero}");
        assert_eq!(invalid_key(zero), "target_params");

        let excess = PruneTarget::Params(1001).to_sparsity(1000).unwrap_err();
        let message = excess.to_string();
        assert!(message.contains("1001"), "{message}");
        assert!(message.contains("at most 1000"), "{message}");
        assert_eq!(invalid_key(excess), "target_params");

        let sparsity = PruneTarget::Sparsity(1.0).to_sparsity(1000).unwrap_err();
        assert_eq!(invalid_key(sparsity), "target");
    }
}
