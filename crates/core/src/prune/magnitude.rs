//! Magnitude pruning: keeps the prunable parameters with the largest |θ| and prunes the rest.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{keep_order, rank_magnitude};
use crate::{Mask, ShardLayout, TensorSpec};

/// Extent of the magnitude threshold: the whole model or each tensor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneScope {
    /// One threshold across all prunable tensors, so tensors end at different sparsities.
    #[default]
    Global,
    /// One threshold per prunable tensor, so every tensor reaches the same sparsity.
    PerLayer,
}

impl FromStr for PruneScope {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "global" => Ok(Self::Global),
            "per_layer" => Ok(Self::PerLayer),
            _ => Err(format!(
                "invalid prune scope `{text}`: expected `global` or `per_layer`"
            )),
        }
    }
}

impl fmt::Display for PruneScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Global => "global",
            Self::PerLayer => "per_layer",
        })
    }
}

/// Returns whether pruning may touch `tensor`: weights (two or more dimensions) always, biases
/// (one dimension) and scalars only with `prune_biases`.
pub fn is_prunable(tensor: &TensorSpec, prune_biases: bool) -> bool {
    prune_biases || tensor.shape.len() >= 2
}

/// Number of prunable parameters of the model, pruned or not.
pub fn prunable_count(layout: &ShardLayout, prune_biases: bool) -> usize {
    layout
        .tensors()
        .iter()
        .filter(|tensor| is_prunable(tensor, prune_biases))
        .map(TensorSpec::numel)
        .sum()
}

/// Fraction of the prunable parameters that `mask` prunes; 0 when nothing is prunable.
pub fn prunable_sparsity(layout: &ShardLayout, mask: &Mask, prune_biases: bool) -> f64 {
    let ranges = prunable_ranges(layout, prune_biases);
    let total: usize = ranges.iter().map(Range::len).sum();
    if total == 0 {
        return 0.0;
    }
    let kept: usize = ranges
        .into_iter()
        .map(|range| mask.count_kept_in(range))
        .sum();
    1.0 - kept as f64 / total as f64
}

/// Number of parameters out of `count` that `sparsity` keeps, rounded to the nearest integer.
pub fn kept_for_sparsity(count: usize, sparsity: f64) -> usize {
    (((1.0 - sparsity) * count as f64).round() as usize).min(count)
}

/// Prunes the prunable parameters with the smallest |θ| until `sparsity` of them are pruned,
/// and returns the new mask.
///
/// The sparsity counts every prunable parameter, including those `current` already prunes.
/// Those stay pruned, so when `current` is already at least as sparse nothing changes.
/// Tensors that are not prunable keep their bits from `current`. Among equal magnitudes the
/// parameter with the lower index is kept, and NaN is pruned before any number.
///
/// # Panics
///
/// When `params` or `current` do not have the layout's length, or `sparsity` is not in [0, 1).
pub fn magnitude_mask(
    params: &[f32],
    layout: &ShardLayout,
    current: &Mask,
    sparsity: f64,
    scope: PruneScope,
    prune_biases: bool,
) -> Mask {
    assert_eq!(
        params.len(),
        layout.total_elems(),
        "params must cover the whole layout"
    );
    assert_eq!(
        current.len(),
        layout.total_elems(),
        "mask must cover the whole layout"
    );
    assert!(
        (0.0..1.0).contains(&sparsity),
        "sparsity {sparsity} is not in [0, 1)"
    );

    let mut mask = current.clone();
    let ranges = prunable_ranges(layout, prune_biases);
    match scope {
        PruneScope::Global => prune_smallest(params, &mut mask, &ranges, sparsity),
        PruneScope::PerLayer => {
            for range in ranges {
                prune_smallest(params, &mut mask, &[range], sparsity);
            }
        }
    }
    mask
}

fn prunable_ranges(layout: &ShardLayout, prune_biases: bool) -> Vec<Range<usize>> {
    layout
        .tensors()
        .iter()
        .enumerate()
        .filter(|(_, tensor)| is_prunable(tensor, prune_biases))
        .map(|(index, _)| layout.tensor_range(index))
        .collect()
}

/// Clears the bits of the smallest kept parameters within `ranges` until `sparsity` of all
/// their parameters are pruned.
fn prune_smallest(params: &[f32], mask: &mut Mask, ranges: &[Range<usize>], sparsity: f64) {
    let total: usize = ranges.iter().map(Range::len).sum();
    let mut candidates: Vec<(f64, usize)> = ranges
        .iter()
        .flat_map(|range| range.clone())
        .filter(|&index| mask.get(index))
        .map(|index| (rank_magnitude(f64::from(params[index].abs())), index))
        .collect();

    let keep = kept_for_sparsity(total, sparsity);
    if keep >= candidates.len() {
        return;
    }

    // A partial selection is O(n), where a full sort of the 1.6M CNN parameters is not needed:
    // afterwards candidates[..keep] contains the `keep` entries first in `keep_order`, which is
    // a total order, so the split is the same on every run.
    candidates.select_nth_unstable_by(keep, keep_order);
    for &(_, index) in &candidates[keep..] {
        mask.set(index, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two weight matrices of 2×4 and their biases: `big` has large values and `small` small
    /// ones, so a global threshold prunes `small` first.
    fn two_layers() -> (ShardLayout, Vec<f32>) {
        let layout = ShardLayout::new(
            vec![
                TensorSpec::new("big.weight", [2, 4]),
                TensorSpec::new("big.bias", [2]),
                TensorSpec::new("small.weight", [2, 4]),
                TensorSpec::new("small.bias", [2]),
            ],
            3,
        )
        .unwrap();
        let params = vec![
            10.0, -11.0, 12.0, -13.0, 14.0, 15.0, -16.0, 17.0, // big.weight
            0.001, 0.002, // big.bias
            0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, // small.weight
            0.003, 0.004, // small.bias
        ];
        (layout, params)
    }

    fn kept_indices(mask: &Mask, range: Range<usize>) -> Vec<usize> {
        range.filter(|&i| mask.get(i)).collect()
    }

    #[test]
    fn global_prunes_small_layer_first() {
        let (layout, params) = two_layers();
        let all = Mask::all_kept(params.len());
        let mask = magnitude_mask(&params, &layout, &all, 0.5, PruneScope::Global, false);

        assert_eq!(kept_indices(&mask, 0..8), (0..8).collect::<Vec<_>>());
        assert_eq!(kept_indices(&mask, 10..18), Vec::<usize>::new());
        assert_eq!(prunable_sparsity(&layout, &mask, false), 0.5);
    }

    #[test]
    fn per_layer_prunes_each_layer_equally() {
        let (layout, params) = two_layers();
        let all = Mask::all_kept(params.len());
        let mask = magnitude_mask(&params, &layout, &all, 0.5, PruneScope::PerLayer, false);

        // The four largest magnitudes of each layer: 14, 15, -16, 17 and 0.5, -0.6, 0.7, -0.8.
        assert_eq!(kept_indices(&mask, 0..8), vec![4, 5, 6, 7]);
        assert_eq!(kept_indices(&mask, 10..18), vec![14, 15, 16, 17]);
        assert_eq!(prunable_sparsity(&layout, &mask, false), 0.5);

        let global = magnitude_mask(&params, &layout, &all, 0.5, PruneScope::Global, false);
        assert_ne!(mask, global);
    }

    #[test]
    fn biases_untouched_by_default() {
        let (layout, params) = two_layers();
        let all = Mask::all_kept(params.len());
        for scope in [PruneScope::Global, PruneScope::PerLayer] {
            let mask = magnitude_mask(&params, &layout, &all, 0.9, scope, false);
            for bias in [8, 9, 18, 19] {
                assert!(mask.get(bias), "{scope}: bias {bias} pruned");
            }
        }
    }

    #[test]
    fn biases_pruned_when_enabled() {
        let (layout, params) = two_layers();
        let all = Mask::all_kept(params.len());
        assert_eq!(prunable_count(&layout, true), 20);

        let mask = magnitude_mask(&params, &layout, &all, 0.5, PruneScope::Global, true);
        assert_eq!(mask.count_kept(), 10);
        for bias in [8, 9, 18, 19] {
            assert!(!mask.get(bias), "bias {bias} kept");
        }
    }

    #[test]
    fn masks_only_shrink() {
        let (layout, params) = two_layers();
        let mut current = Mask::all_kept(params.len());
        // Prune the largest weight of each layer, which magnitude alone would keep.
        current.set(7, false);
        current.set(17, false);

        for scope in [PruneScope::Global, PruneScope::PerLayer] {
            let mask = magnitude_mask(&params, &layout, &current, 0.25, scope, false);
            assert!(!mask.get(7), "{scope}: index 7 came back");
            assert!(!mask.get(17), "{scope}: index 17 came back");
            for index in 0..params.len() {
                assert!(
                    !mask.get(index) || current.get(index),
                    "{scope}: index {index}"
                );
            }
            assert_eq!(mask.count_kept_in(0..8) + mask.count_kept_in(10..18), 12);
        }
    }

    #[test]
    fn lower_target_keeps_current_mask() {
        let (layout, params) = two_layers();
        let all = Mask::all_kept(params.len());
        let sparse = magnitude_mask(&params, &layout, &all, 0.75, PruneScope::Global, false);
        let again = magnitude_mask(&params, &layout, &sparse, 0.5, PruneScope::Global, false);
        assert_eq!(again, sparse);
    }

    #[test]
    fn kept_count_is_exact() {
        // Three weight tensors with sizes that do not divide evenly, and a bias.
        let layout = ShardLayout::new(
            vec![
                TensorSpec::new("a", [7, 13]),
                TensorSpec::new("b", [5, 3, 2]),
                TensorSpec::new("b.bias", [5]),
                TensorSpec::new("c", [1, 101]),
            ],
            64,
        )
        .unwrap();
        let params: Vec<f32> = (0..layout.total_elems())
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        let all = Mask::all_kept(params.len());
        let prunable = prunable_count(&layout, false);
        assert_eq!(prunable, 91 + 30 + 101);

        for sparsity in [0.0, 0.1, 0.33, 0.5, 0.9, 0.99] {
            let global =
                magnitude_mask(&params, &layout, &all, sparsity, PruneScope::Global, false);
            assert_eq!(
                global.count_kept() - 5,
                kept_for_sparsity(prunable, sparsity),
                "global at {sparsity}"
            );

            let per_layer = magnitude_mask(
                &params,
                &layout,
                &all,
                sparsity,
                PruneScope::PerLayer,
                false,
            );
            for tensor in [0, 1, 3] {
                let range = layout.tensor_range(tensor);
                assert_eq!(
                    per_layer.count_kept_in(range.clone()),
                    kept_for_sparsity(range.len(), sparsity),
                    "tensor {tensor} at {sparsity}"
                );
            }
        }
    }

    #[test]
    fn ties_keep_lower_index() {
        let layout = ShardLayout::new(vec![TensorSpec::new("w", [2, 3])], 8).unwrap();
        let params = [1.0, -1.0, 1.0, 1.0, -1.0, 1.0];
        let all = Mask::all_kept(6);
        let mask = magnitude_mask(&params, &layout, &all, 0.5, PruneScope::Global, false);
        assert_eq!(kept_indices(&mask, 0..6), vec![0, 1, 2]);
    }

    #[test]
    fn nan_pruned_before_numbers() {
        let layout = ShardLayout::new(vec![TensorSpec::new("w", [2, 2])], 8).unwrap();
        let params = [f32::NAN, 0.0, 1e-30, f32::NAN];
        let all = Mask::all_kept(4);
        let mask = magnitude_mask(&params, &layout, &all, 0.5, PruneScope::Global, false);
        assert_eq!(kept_indices(&mask, 0..4), vec![1, 2]);
    }

    #[test]
    fn scope_parses_and_prints() {
        for scope in [PruneScope::Global, PruneScope::PerLayer] {
            assert_eq!(scope.to_string().parse::<PruneScope>(), Ok(scope));
        }
        assert!(
            "layer"
                .parse::<PruneScope>()
                .unwrap_err()
                .contains("`layer`")
        );
    }
}
