//! Structured pruning: removes whole neurons or channels, and cuts them out of the tensors so
//! that an exported dense model is truly smaller.
//!
//! Each tensor is seen as a matrix of `shape[0]` rows (PyTorch layout: output units first).
//! A unit of a [`StructuredGroup`] owns one row of the group's weight, one element of its
//! bias, and in every row of the next layer's weight the block of `next_in_per_unit`
//! consecutive elements that read the unit.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{PruneError, check_sparsity, invalid, keep_order, kept_for_sparsity, rank_magnitude};
use crate::{Mask, ShardLayout, TensorSpec};

/// Kind of unit that structured pruning removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Structure {
    /// Output neurons of dense layers: groups whose weight has two dimensions.
    Neurons,
    /// Output channels of convolutions: groups whose weight has more than two dimensions.
    Channels,
}

impl FromStr for Structure {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "neurons" => Ok(Self::Neurons),
            "channels" => Ok(Self::Channels),
            _ => Err(format!(
                "invalid structure `{text}`: expected `neurons` or `channels`"
            )),
        }
    }
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Neurons => "neurons",
            Self::Channels => "channels",
        })
    }
}

/// A layer whose output units can be removed together with everything that reads them.
///
/// Unit j is row j of `out_weight`, element j of `out_bias`, and in every row of
/// `next_weight` the elements `j·next_in_per_unit .. (j + 1)·next_in_per_unit`. That block is
/// 1 element after a dense layer, kh·kw for a convolution after a convolution (input channel
/// j), and H·W for a dense layer after the flatten of a C×H×W feature map (49 for a 64×7×7
/// map). The output layer has no next layer, so it is never a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StructuredGroup {
    /// Index in the layout of the weight whose rows are the units.
    pub out_weight: usize,
    /// Index in the layout of the bias of `out_weight`, one element per unit.
    pub out_bias: Option<usize>,
    /// Index in the layout of the weight of the layer that reads the units.
    pub next_weight: usize,
    /// Consecutive elements of each `next_weight` row that read one unit.
    pub next_in_per_unit: usize,
}

impl StructuredGroup {
    /// Returns the kind of unit of this group: neurons for a 2-D weight, channels otherwise.
    pub fn structure(&self, layout: &ShardLayout) -> Structure {
        if layout.tensors()[self.out_weight].shape.len() == 2 {
            Structure::Neurons
        } else {
            Structure::Channels
        }
    }
}

/// Location of the elements of one group's units in the flat parameter vector.
struct GroupGeometry {
    units: usize,
    out: Range<usize>,
    out_row_len: usize,
    bias_start: Option<usize>,
    next: Range<usize>,
    next_row_len: usize,
    per_unit: usize,
}

impl GroupGeometry {
    /// Flat ranges of every element that unit `unit` owns.
    fn unit_ranges(&self, unit: usize) -> impl Iterator<Item = Range<usize>> + '_ {
        let row_start = self.out.start + unit * self.out_row_len;
        let bias = self.bias_start.map(|start| start + unit..start + unit + 1);
        let next_rows = self.next.len() / self.next_row_len;
        let columns = (0..next_rows).map(move |row| {
            let start = self.next.start + row * self.next_row_len + unit * self.per_unit;
            start..start + self.per_unit
        });
        std::iter::once(row_start..row_start + self.out_row_len)
            .chain(bias)
            .chain(columns)
    }

    fn is_alive(&self, mask: &Mask, unit: usize) -> bool {
        self.unit_ranges(unit)
            .any(|range| range.into_iter().any(|index| mask.get(index)))
    }

    /// L2 norm of the kept entries of the unit's `out_weight` row.
    fn row_norm(&self, params: &[f32], mask: &Mask, unit: usize) -> f64 {
        let start = self.out.start + unit * self.out_row_len;
        (start..start + self.out_row_len)
            .filter(|&index| mask.get(index))
            .map(|index| f64::from(params[index]).powi(2))
            .sum::<f64>()
            .sqrt()
    }
}

/// Checks that every group fits the layout and that no tensor plays two roles that would
/// cut it twice.
fn validate_groups(
    layout: &ShardLayout,
    groups: &[StructuredGroup],
) -> Result<Vec<GroupGeometry>, PruneError> {
    let tensors = layout.tensors();
    let mut out_owner = vec![None; tensors.len()];
    let mut next_owner = vec![None; tensors.len()];
    let mut bias_owner = vec![None; tensors.len()];
    let mut geometries = Vec::with_capacity(groups.len());

    for (group, spec) in groups.iter().enumerate() {
        let error = |reason: String| PruneError::InvalidGroup { group, reason };
        for (role, index) in [
            ("out_weight", Some(spec.out_weight)),
            ("out_bias", spec.out_bias),
            ("next_weight", Some(spec.next_weight)),
        ] {
            if let Some(index) = index
                && index >= tensors.len()
            {
                return Err(error(format!(
                    "{role} {index} is not a tensor of the layout, which has {}",
                    tensors.len()
                )));
            }
        }

        let out = &tensors[spec.out_weight];
        let next = &tensors[spec.next_weight];
        if spec.out_weight == spec.next_weight {
            return Err(error(format!(
                "`{}` cannot be both out_weight and next_weight",
                out.name
            )));
        }
        if out.shape.len() < 2 {
            return Err(error(format!(
                "out_weight `{}` has shape {:?}; it needs a dimension for units and one for inputs",
                out.name, out.shape
            )));
        }
        let units = out.shape[0];
        if let Some(bias) = spec.out_bias {
            let bias = &tensors[bias];
            if bias.shape != [units] {
                return Err(error(format!(
                    "out_bias `{}` has shape {:?}, but `{}` has {units} units",
                    bias.name, bias.shape, out.name
                )));
            }
        }
        if spec.next_in_per_unit == 0 {
            return Err(error("next_in_per_unit must be at least 1".into()));
        }
        let next_row_len = next.numel() / next.shape.first().copied().unwrap_or(1);
        let aligned = next.shape.len() >= 2 && next.shape[1].is_multiple_of(units);
        if !aligned || next_row_len != units * spec.next_in_per_unit {
            return Err(error(format!(
                "next_weight `{}` of shape {:?} does not read {units} units of {} elements \
                 each: its second dimension must be a multiple of {units} and its rows {} long",
                next.name,
                next.shape,
                spec.next_in_per_unit,
                units * spec.next_in_per_unit
            )));
        }

        claim(
            &mut out_owner,
            spec.out_weight,
            group,
            "out_weight",
            tensors,
        )?;
        claim(
            &mut next_owner,
            spec.next_weight,
            group,
            "next_weight",
            tensors,
        )?;
        if let Some(bias) = spec.out_bias {
            claim(&mut bias_owner, bias, group, "out_bias", tensors)?;
        }

        geometries.push(GroupGeometry {
            units,
            out: layout.tensor_range(spec.out_weight),
            out_row_len: out.numel() / units,
            bias_start: spec.out_bias.map(|bias| layout.tensor_range(bias).start),
            next: layout.tensor_range(spec.next_weight),
            next_row_len,
            per_unit: spec.next_in_per_unit,
        });
    }

    for (index, owner) in bias_owner.iter().enumerate() {
        if let Some(group) = *owner
            && (out_owner[index].is_some() || next_owner[index].is_some())
        {
            return Err(PruneError::InvalidGroup {
                group,
                reason: format!(
                    "out_bias `{}` is also a weight of a group",
                    tensors[index].name
                ),
            });
        }
    }
    Ok(geometries)
}

/// Records that `group` uses tensor `index` in `role`, unless another group already does.
fn claim(
    owners: &mut [Option<usize>],
    index: usize,
    group: usize,
    role: &str,
    tensors: &[TensorSpec],
) -> Result<(), PruneError> {
    if let Some(other) = owners[index] {
        return Err(PruneError::InvalidGroup {
            group,
            reason: format!(
                "`{}` is already the {role} of group {other}",
                tensors[index].name
            ),
        });
    }
    owners[index] = Some(group);
    Ok(())
}

/// Removes `fraction_removed` of the units of every group, those with the smallest L2 norm
/// of their `out_weight` row, and returns the new mask with the kept units of each group.
///
/// A unit is removed by pruning its row, its bias element and its columns in the next layer.
/// The fraction counts every unit, including units that `current` already removed. Those
/// stay removed, and at least one unit of each group is kept unless `current` already
/// removed them all. Norms are taken from `current`'s kept entries, so the order of the
/// groups does not matter. Among equal norms the lower unit index is kept, and a NaN norm is
/// removed first.
///
/// # Panics
///
/// When `params` or `current` do not have the layout's length.
pub fn structured_mask(
    params: &[f32],
    layout: &ShardLayout,
    current: &Mask,
    groups: &[StructuredGroup],
    fraction_removed: f64,
) -> Result<(Mask, Vec<Vec<usize>>), PruneError> {
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
    check_sparsity("fraction_removed", fraction_removed)?;
    let geometries = validate_groups(layout, groups)?;

    let mut mask = current.clone();
    let mut kept_per_group = Vec::with_capacity(geometries.len());
    for geometry in &geometries {
        let keep = kept_for_sparsity(geometry.units, fraction_removed).max(1);
        let mut alive: Vec<(f64, usize)> = (0..geometry.units)
            .filter(|&unit| geometry.is_alive(current, unit))
            .map(|unit| {
                (
                    rank_magnitude(geometry.row_norm(params, current, unit)),
                    unit,
                )
            })
            .collect();
        alive.sort_unstable_by(keep_order);
        alive.truncate(keep);

        let mut kept: Vec<usize> = alive.into_iter().map(|(_, unit)| unit).collect();
        kept.sort_unstable();
        let mut is_kept = vec![false; geometry.units];
        for &unit in &kept {
            is_kept[unit] = true;
        }
        for unit in (0..geometry.units).filter(|&unit| !is_kept[unit]) {
            for range in geometry.unit_ranges(unit) {
                for index in range {
                    mask.set(index, false);
                }
            }
        }
        kept_per_group.push(kept);
    }
    Ok((mask, kept_per_group))
}

/// Returns the units of each group that `mask` keeps: a unit is kept while any element it
/// owns (row, bias element or next-layer column) is kept.
pub fn kept_units(
    layout: &ShardLayout,
    mask: &Mask,
    groups: &[StructuredGroup],
) -> Result<Vec<Vec<usize>>, PruneError> {
    assert_eq!(
        mask.len(),
        layout.total_elems(),
        "mask must cover the whole layout"
    );
    let geometries = validate_groups(layout, groups)?;
    Ok(geometries
        .iter()
        .map(|geometry| {
            (0..geometry.units)
                .filter(|&unit| geometry.is_alive(mask, unit))
                .collect()
        })
        .collect())
}

/// Rows and column blocks of one tensor that survive the compaction.
struct TensorCut {
    range: Range<usize>,
    row_len: usize,
    /// Kept rows, or `None` for all of them.
    rows: Option<Vec<usize>>,
    /// Block length and kept blocks of each row, or `None` for the whole row.
    blocks: Option<(usize, Vec<usize>)>,
}

/// The model with the removed units cut out: smaller tensor shapes, and the map from the full
/// parameter vector to the compacted one.
pub struct Compaction {
    tensors: Vec<TensorSpec>,
    cuts: Vec<TensorCut>,
}

impl Compaction {
    /// Plans the cut of every unit of `groups` that is not in `kept_units` (one ascending
    /// list per group, as [`structured_mask`] and [`kept_units`] return). Every group must
    /// keep at least one unit.
    pub fn new(
        layout: &ShardLayout,
        groups: &[StructuredGroup],
        kept_units: &[Vec<usize>],
    ) -> Result<Self, PruneError> {
        let geometries = validate_groups(layout, groups)?;
        if kept_units.len() != groups.len() {
            return Err(invalid(
                "kept_units",
                format!("{} lists", kept_units.len()),
                format!("expected one list per group, {} in all", groups.len()),
            ));
        }
        for (group, (kept, geometry)) in kept_units.iter().zip(&geometries).enumerate() {
            check_kept_units(group, kept, geometry.units)?;
        }

        let mut tensors = layout.tensors().to_vec();
        let mut cuts: Vec<TensorCut> = tensors
            .iter()
            .enumerate()
            .map(|(index, spec)| TensorCut {
                range: layout.tensor_range(index),
                row_len: spec.numel() / spec.shape.first().copied().unwrap_or(1),
                rows: None,
                blocks: None,
            })
            .collect();

        for ((spec, kept), geometry) in groups.iter().zip(kept_units).zip(&geometries) {
            tensors[spec.out_weight].shape[0] = kept.len();
            cuts[spec.out_weight].rows = Some(kept.clone());

            if let Some(bias) = spec.out_bias {
                tensors[bias].shape[0] = kept.len();
                cuts[bias].rows = Some(kept.clone());
            }

            let next_shape = &mut tensors[spec.next_weight].shape;
            next_shape[1] = next_shape[1] / geometry.units * kept.len();
            cuts[spec.next_weight].blocks = Some((spec.next_in_per_unit, kept.clone()));
        }
        Ok(Self { tensors, cuts })
    }

    /// Names and shapes of the compacted tensors, in the layout's order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Number of parameters of the compacted model.
    pub fn total_elems(&self) -> usize {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }

    /// Gathers the compacted parameter vector from the full one, tensor by tensor in
    /// row-major order.
    ///
    /// # Panics
    ///
    /// When `params` is shorter than the layout the compaction was planned for.
    pub fn gather(&self, params: &[f32]) -> Vec<f32> {
        let mut compacted = Vec::with_capacity(self.total_elems());
        self.for_each_kept_range(|range| compacted.extend_from_slice(&params[range]));
        compacted
    }

    /// Gathers the mask of the compacted parameter vector from the full mask, in the order
    /// of [`Compaction::gather`].
    ///
    /// # Panics
    ///
    /// When `mask` is shorter than the layout the compaction was planned for.
    pub fn gather_mask(&self, mask: &Mask) -> Mask {
        let mut bits = Vec::with_capacity(self.total_elems());
        self.for_each_kept_range(|range| bits.extend(range.map(|index| mask.get(index))));
        Mask::from_bools(&bits)
    }

    fn for_each_kept_range(&self, mut visit: impl FnMut(Range<usize>)) {
        for cut in &self.cuts {
            let all_rows = cut.range.len() / cut.row_len;
            let rows: Box<dyn Iterator<Item = usize>> = match &cut.rows {
                Some(rows) => Box::new(rows.iter().copied()),
                None => Box::new(0..all_rows),
            };
            for row in rows {
                let row_start = cut.range.start + row * cut.row_len;
                match &cut.blocks {
                    Some((block_len, blocks)) => {
                        for &block in blocks {
                            let start = row_start + block * block_len;
                            visit(start..start + block_len);
                        }
                    }
                    None => visit(row_start..row_start + cut.row_len),
                }
            }
        }
    }
}

fn check_kept_units(group: usize, kept: &[usize], units: usize) -> Result<(), PruneError> {
    let error = |reason: String| PruneError::InvalidKeptUnits { group, reason };
    if kept.is_empty() {
        return Err(error(
            "no unit is kept; every group must keep at least one".into(),
        ));
    }
    if let Some(&unit) = kept.iter().find(|&&unit| unit >= units) {
        return Err(error(format!(
            "unit {unit} does not exist; the group has {units} units"
        )));
    }
    if let Some(pair) = kept.windows(2).find(|pair| pair[0] >= pair[1]) {
        return Err(error(format!(
            "units must ascend without repeats, but {} follows {}",
            pair[1], pair[0]
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small MLP with the dense → dense pattern: fc1 [4, 3], fc2 [3, 4], fc3 [2, 3].
    fn mlp() -> (ShardLayout, Vec<StructuredGroup>) {
        let layout = ShardLayout::new(
            vec![
                TensorSpec::new("fc1.weight", [4, 3]),
                TensorSpec::new("fc1.bias", [4]),
                TensorSpec::new("fc2.weight", [3, 4]),
                TensorSpec::new("fc2.bias", [3]),
                TensorSpec::new("fc3.weight", [2, 3]),
                TensorSpec::new("fc3.bias", [2]),
            ],
            5,
        )
        .unwrap();
        let groups = vec![
            StructuredGroup {
                out_weight: 0,
                out_bias: Some(1),
                next_weight: 2,
                next_in_per_unit: 1,
            },
            StructuredGroup {
                out_weight: 2,
                out_bias: Some(3),
                next_weight: 4,
                next_in_per_unit: 1,
            },
        ];
        (layout, groups)
    }

    /// A small CNN with the conv → conv → flatten → dense pattern: conv1 [4, 1, 2, 2],
    /// conv2 [3, 4, 2, 2], a 3×2×2 feature map flattened into fc1 [5, 12], and fc2 [2, 5].
    fn cnn() -> (ShardLayout, Vec<StructuredGroup>) {
        let layout = ShardLayout::new(
            vec![
                TensorSpec::new("conv1.weight", [4, 1, 2, 2]),
                TensorSpec::new("conv1.bias", [4]),
                TensorSpec::new("conv2.weight", [3, 4, 2, 2]),
                TensorSpec::new("conv2.bias", [3]),
                TensorSpec::new("fc1.weight", [5, 12]),
                TensorSpec::new("fc1.bias", [5]),
                TensorSpec::new("fc2.weight", [2, 5]),
                TensorSpec::new("fc2.bias", [2]),
            ],
            16,
        )
        .unwrap();
        let groups = vec![
            StructuredGroup {
                out_weight: 0,
                out_bias: Some(1),
                next_weight: 2,
                next_in_per_unit: 4,
            },
            StructuredGroup {
                out_weight: 2,
                out_bias: Some(3),
                next_weight: 4,
                next_in_per_unit: 4,
            },
            StructuredGroup {
                out_weight: 4,
                out_bias: Some(5),
                next_weight: 6,
                next_in_per_unit: 1,
            },
        ];
        (layout, groups)
    }

    /// Parameters equal to their flat index plus one, so every value is distinct and nonzero.
    fn indexed(layout: &ShardLayout) -> Vec<f32> {
        (0..layout.total_elems()).map(|i| (i + 1) as f32).collect()
    }

    /// Scales row `unit` of tensor `tensor` by `factor`.
    fn scale_row(
        params: &mut [f32],
        layout: &ShardLayout,
        tensor: usize,
        unit: usize,
        factor: f32,
    ) {
        let range = layout.tensor_range(tensor);
        let row_len = range.len() / layout.tensors()[tensor].shape[0];
        let start = range.start + unit * row_len;
        for value in &mut params[start..start + row_len] {
            *value *= factor;
        }
    }

    fn pruned(mask: &Mask, range: Range<usize>) -> Vec<usize> {
        range.filter(|&i| !mask.get(i)).collect()
    }

    #[test]
    fn dense_removes_rows_bias_and_columns() {
        let (layout, groups) = mlp();
        let mut params = indexed(&layout);
        // fc1 unit 2 and fc2 unit 0 get the smallest norms of their layers.
        scale_row(&mut params, &layout, 0, 2, 1e-3);
        scale_row(&mut params, &layout, 2, 0, 1e-3);
        let all = Mask::all_kept(params.len());

        let (mask, kept) = structured_mask(&params, &layout, &all, &groups, 0.25).unwrap();
        assert_eq!(kept, vec![vec![0, 1, 3], vec![1, 2]]);

        // fc1 row 2, fc1.bias[2], and column 2 of every fc2 row.
        assert_eq!(pruned(&mask, 0..12), vec![6, 7, 8]);
        assert_eq!(pruned(&mask, 12..16), vec![14]);
        // fc2 row 0 (all four entries), and column 2 of rows 1 and 2.
        assert_eq!(pruned(&mask, 16..28), vec![16, 17, 18, 19, 22, 26]);
        assert_eq!(pruned(&mask, 28..31), vec![28]);
        // Column 0 of both fc3 rows; fc3.bias untouched.
        assert_eq!(pruned(&mask, 31..37), vec![31, 34]);
        assert_eq!(pruned(&mask, 37..39), Vec::<usize>::new());
    }

    #[test]
    fn conv_removes_channels_and_flatten_blocks() {
        let (layout, groups) = cnn();
        let mut params = indexed(&layout);
        scale_row(&mut params, &layout, 0, 1, 1e-3);
        scale_row(&mut params, &layout, 2, 2, 1e-3);
        let all = Mask::all_kept(params.len());

        let (mask, kept) = structured_mask(&params, &layout, &all, &groups, 0.25).unwrap();
        // Kept units: round(0.75 · 4) = 3, round(0.75 · 3) = 2 and round(0.75 · 5) = 4.
        assert_eq!(kept[0], vec![0, 2, 3]);
        assert_eq!(kept[1], vec![0, 1]);
        assert_eq!(kept[2].len(), 4);

        // conv1 channel 1 (elements 4..8) and conv1.bias[1].
        assert_eq!(pruned(&mask, 0..16), vec![4, 5, 6, 7]);
        assert_eq!(pruned(&mask, 16..20), vec![17]);
        // conv2: input channel 1 of every output channel (next_weight[:, 1, :, :]), then all
        // of output channel 2.
        let conv2 = layout.tensor_range(2);
        let mut expected: Vec<usize> = (0..2)
            .flat_map(|out| (0..4).map(move |k| conv2.start + out * 16 + 4 + k))
            .collect();
        expected.extend(conv2.start + 32..conv2.start + 48);
        assert_eq!(pruned(&mask, conv2.clone()), expected);
        assert_eq!(pruned(&mask, layout.tensor_range(3)), vec![conv2.end + 2]);

        // fc1: the flattened block of channel 2 (columns 8..12) in every row, and the row of
        // the removed fc1 unit.
        let fc1 = layout.tensor_range(4);
        let removed_fc1 = (0..5).find(|unit| !kept[2].contains(unit)).unwrap();
        for row in 0..5 {
            for column in 0..12 {
                let index = fc1.start + row * 12 + column;
                let expected_kept = column < 8 && row != removed_fc1;
                assert_eq!(mask.get(index), expected_kept, "fc1[{row}, {column}]");
            }
        }
        // fc2: the column of the removed fc1 unit.
        let fc2 = layout.tensor_range(6);
        assert_eq!(
            pruned(&mask, fc2.clone()),
            vec![fc2.start + removed_fc1, fc2.start + 5 + removed_fc1]
        );
    }

    #[test]
    fn keeps_one_unit_at_least() {
        let (layout, groups) = mlp();
        let params = indexed(&layout);
        let all = Mask::all_kept(params.len());
        let (_, kept) = structured_mask(&params, &layout, &all, &groups, 0.99).unwrap();
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].len(), 1);
        assert_eq!(kept[1].len(), 1);
    }

    #[test]
    fn removed_units_stay_removed() {
        let (layout, groups) = mlp();
        let mut params = indexed(&layout);
        let all = Mask::all_kept(params.len());
        scale_row(&mut params, &layout, 0, 0, 1e-3);
        let (first, kept) = structured_mask(&params, &layout, &all, &groups, 0.25).unwrap();
        assert_eq!(kept[0], vec![1, 2, 3]);

        // Unit 0 would now win on norm, but it is already removed.
        scale_row(&mut params, &layout, 0, 0, 1e6);
        scale_row(&mut params, &layout, 0, 3, 1e-3);
        let (second, kept) = structured_mask(&params, &layout, &first, &groups, 0.5).unwrap();
        assert_eq!(kept[0], vec![1, 2]);
        for index in 0..params.len() {
            assert!(
                !second.get(index) || first.get(index),
                "index {index} came back"
            );
        }
        assert_eq!(kept_units(&layout, &second, &groups).unwrap(), kept);
    }

    #[test]
    fn equal_norms_keep_lower_units() {
        let (layout, groups) = mlp();
        let params = vec![1.0; layout.total_elems()];
        let all = Mask::all_kept(params.len());
        let (_, kept) = structured_mask(&params, &layout, &all, &groups, 0.5).unwrap();
        assert_eq!(kept[0], vec![0, 1]);
        assert_eq!(kept[1], vec![0, 1]);
    }

    #[test]
    fn compaction_shrinks_shapes() {
        let (layout, groups) = cnn();
        let kept = vec![vec![0, 2, 3], vec![1], vec![0, 1, 4]];
        let compaction = Compaction::new(&layout, &groups, &kept).unwrap();
        let shapes: Vec<(&str, &[usize])> = compaction
            .tensors()
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        assert_eq!(
            shapes,
            vec![
                ("conv1.weight", &[3, 1, 2, 2][..]),
                ("conv1.bias", &[3][..]),
                ("conv2.weight", &[1, 3, 2, 2][..]),
                ("conv2.bias", &[1][..]),
                ("fc1.weight", &[3, 4][..]),
                ("fc1.bias", &[3][..]),
                ("fc2.weight", &[2, 3][..]),
                ("fc2.bias", &[2][..]),
            ]
        );
        assert_eq!(compaction.total_elems(), 12 + 3 + 12 + 1 + 12 + 3 + 6 + 2);
    }

    #[test]
    fn compaction_gathers_kept_entries() {
        let (layout, groups) = mlp();
        let params = indexed(&layout);
        let kept = vec![vec![1, 3], vec![0, 2]];
        let compaction = Compaction::new(&layout, &groups, &kept).unwrap();
        let compacted = compaction.gather(&params);

        // Values are flat index + 1; fc1 rows 1 and 3; fc2 rows 0 and 2, columns 1 and 3.
        let fc1 = [4.0, 5.0, 6.0, 10.0, 11.0, 12.0];
        let fc1_bias = [14.0, 16.0];
        let fc2 = [18.0, 20.0, 26.0, 28.0];
        let fc2_bias = [29.0, 31.0];
        let fc3 = [32.0, 34.0, 35.0, 37.0];
        let fc3_bias = [38.0, 39.0];
        let expected: Vec<f32> = [&fc1[..], &fc1_bias, &fc2, &fc2_bias, &fc3, &fc3_bias].concat();
        assert_eq!(compacted, expected);
        assert_eq!(compacted.len(), compaction.total_elems());
    }

    #[test]
    fn compaction_matches_structured_mask() {
        let (layout, groups) = cnn();
        let mut params = indexed(&layout);
        scale_row(&mut params, &layout, 0, 3, 1e-2);
        scale_row(&mut params, &layout, 4, 2, 1e-2);
        let all = Mask::all_kept(params.len());
        let (mask, kept) = structured_mask(&params, &layout, &all, &groups, 0.25).unwrap();
        let compaction = Compaction::new(&layout, &groups, &kept).unwrap();

        // Every kept entry of the full model lands in the compacted one, in order, and
        // nothing else does.
        let kept_values: Vec<f32> = (0..params.len())
            .filter(|&i| mask.get(i))
            .map(|i| params[i])
            .collect();
        assert_eq!(compaction.gather(&params), kept_values);
        assert_eq!(
            compaction.gather_mask(&mask),
            Mask::all_kept(kept_values.len())
        );
    }

    #[test]
    fn compaction_rejects_bad_kept_units() {
        let (layout, groups) = mlp();
        let cases = [
            (vec![vec![0]], "kept_units"),
            (vec![vec![], vec![0]], "at least one"),
            (vec![vec![4], vec![0]], "unit 4 does not exist"),
            (vec![vec![1, 1], vec![0]], "1 follows 1"),
            (vec![vec![2, 1], vec![0]], "1 follows 2"),
        ];
        for (kept, fragment) in cases {
            let error = Compaction::new(&layout, &groups, &kept).err().unwrap();
            assert!(error.to_string().contains(fragment), "{error}");
        }
    }

    #[test]
    fn groups_rejected_when_inconsistent() {
        let (layout, groups) = mlp();
        let all = Mask::all_kept(layout.total_elems());
        let params = indexed(&layout);
        let second = groups[1];
        let with = |change: &dyn Fn(&mut StructuredGroup)| {
            let mut groups = groups.clone();
            change(&mut groups[0]);
            groups
        };
        let cases = [
            (with(&|g| g.out_weight = 9), "out_weight 9 is not a tensor"),
            (
                with(&|g| g.next_weight = 0),
                "both out_weight and next_weight",
            ),
            (with(&|g| g.out_bias = Some(3)), "has 4 units"),
            (with(&|g| g.next_in_per_unit = 2), "does not read 4 units"),
            (with(&|g| g.next_in_per_unit = 0), "at least 1"),
            (with(&|g| g.out_weight = 1), "needs a dimension"),
            (with(&|g| g.next_weight = 4), "does not read 4 units"),
            (with(&|g| *g = second), "already the out_weight of group 0"),
        ];
        for (groups, fragment) in cases {
            let error = structured_mask(&params, &layout, &all, &groups, 0.5).unwrap_err();
            assert!(error.to_string().contains(fragment), "{fragment}: {error}");
        }

        let error = structured_mask(&params, &layout, &all, &groups, 1.0).unwrap_err();
        assert!(
            error.to_string().contains("`fraction_removed` = 1"),
            "{error}"
        );
    }

    #[test]
    fn structure_follows_weight_rank() {
        let (layout, groups) = cnn();
        assert_eq!(groups[0].structure(&layout), Structure::Channels);
        assert_eq!(groups[2].structure(&layout), Structure::Neurons);
        assert_eq!("channels".parse(), Ok(Structure::Channels));
        assert_eq!(Structure::Neurons.to_string(), "neurons");
    }
}
