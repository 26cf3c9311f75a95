//! burn modules of the two models, and their exact conversion to and from θ.
//!
//! θ stores each tensor with its PyTorch name and shape. burn keeps a dense layer's weight as
//! `[d_in, d_out]` where PyTorch has `[out, in]`, so dense weights are transposed on the way in
//! and out. Convolution weights have the same `[out, in, kh, kw]` layout in both.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::nn::conv::Conv2d;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Bool, Device, Tensor, TensorData};

use crate::error::ModelError;
use crate::spec::{CNN_FLAT, IMAGE_SIDE, Layer, ModelKind};

/// Padding of the 5x5 convolutions, which keeps the image size.
const CONV_PADDING: usize = 2;

/// Classifier of standardized 28x28 images that can be built from θ.
pub(crate) trait Network: Module + Sized {
    /// Builds the module from a θ of the right length; tensors go to `device`.
    fn from_params(params: &[f32], device: &Device) -> Self;

    /// Maps standardized pixels `[batch, 784]` to logits `[batch, 10]`.
    fn forward(&self, pixels: Tensor<2>) -> Tensor<2>;

    fn kind() -> ModelKind;
}

// NOTE: in both models the field order is the order of θ, because the module visitor and
// mapper below walk the parameters in field order.
#[derive(Module, Debug)]
pub(crate) struct Mlp {
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
}

#[derive(Module, Debug)]
pub(crate) struct Cnn {
    conv1: Conv2d,
    conv2: Conv2d,
    fc1: Linear,
    fc2: Linear,
    pool: MaxPool2d,
}

impl Network for Mlp {
    fn from_params(params: &[f32], device: &Device) -> Self {
        let mut reader = ParamReader::new(ModelKind::Mlp, params, device);
        Mlp {
            fc1: reader.linear(),
            fc2: reader.linear(),
            fc3: reader.linear(),
        }
    }

    fn forward(&self, pixels: Tensor<2>) -> Tensor<2> {
        let hidden = relu(self.fc1.forward(pixels));
        let hidden = relu(self.fc2.forward(hidden));
        self.fc3.forward(hidden)
    }

    fn kind() -> ModelKind {
        ModelKind::Mlp
    }
}

impl Network for Cnn {
    fn from_params(params: &[f32], device: &Device) -> Self {
        let mut reader = ParamReader::new(ModelKind::Cnn, params, device);
        Cnn {
            conv1: reader.conv2d(),
            conv2: reader.conv2d(),
            fc1: reader.linear(),
            fc2: reader.linear(),
            pool: MaxPool2dConfig::new([2, 2]).init(),
        }
    }

    fn forward(&self, pixels: Tensor<2>) -> Tensor<2> {
        let [batch, _] = pixels.dims();
        let images = pixels.reshape([batch, 1, IMAGE_SIDE, IMAGE_SIDE]);
        let features = self.pool.forward(relu(self.conv1.forward(images)));
        let features = self.pool.forward(relu(self.conv2.forward(features)));
        // Flattening [batch, channels, height, width] row-major gives PyTorch's
        // `x.view(batch, -1)` order, so fc1.weight is interchangeable with PyTorch's.
        let flat = features.reshape([batch, CNN_FLAT]);
        let hidden = relu(self.fc1.forward(flat));
        self.fc2.forward(hidden)
    }

    fn kind() -> ModelKind {
        ModelKind::Cnn
    }
}

/// Cuts θ into the tensors of consecutive layers.
struct ParamReader<'a> {
    params: &'a [f32],
    offset: usize,
    layers: std::slice::Iter<'static, Layer>,
    device: &'a Device,
}

impl<'a> ParamReader<'a> {
    fn new(kind: ModelKind, params: &'a [f32], device: &'a Device) -> Self {
        assert_eq!(
            params.len(),
            kind.num_params(),
            "the caller checks the length of θ"
        );
        ParamReader {
            params,
            offset: 0,
            layers: kind.layers().iter(),
            device,
        }
    }

    fn take(&mut self, count: usize) -> Vec<f32> {
        let values = self.params[self.offset..self.offset + count].to_vec();
        self.offset += count;
        values
    }

    fn param<const D: usize>(&self, values: Vec<f32>, shape: [usize; D]) -> Param<Tensor<D>> {
        Param::from_tensor(Tensor::from_data(
            TensorData::new(values, shape),
            self.device,
        ))
    }

    fn linear(&mut self) -> Linear {
        let Some(&Layer::Linear { d_in, d_out, .. }) = self.layers.next() else {
            panic!("the layer table lists a dense layer here");
        };
        let weight = transpose(&self.take(d_out * d_in), d_out, d_in);
        let bias = self.take(d_out);
        Linear {
            weight: self.param(weight, [d_in, d_out]),
            bias: Some(self.param(bias, [d_out])),
        }
    }

    fn conv2d(&mut self) -> Conv2d {
        let Some(&Layer::Conv2d {
            channels_in,
            channels_out,
            kernel,
            ..
        }) = self.layers.next()
        else {
            panic!("the layer table lists a convolution here");
        };
        let weight = self.take(channels_out * channels_in * kernel * kernel);
        let bias = self.take(channels_out);
        Conv2d {
            weight: self.param(weight, [channels_out, channels_in, kernel, kernel]),
            bias: Some(self.param(bias, [channels_out])),
            stride: [1, 1],
            kernel_size: [kernel, kernel],
            dilation: [1, 1],
            groups: 1,
            padding: PaddingConfig2d::Explicit(
                CONV_PADDING,
                CONV_PADDING,
                CONV_PADDING,
                CONV_PADDING,
            ),
        }
    }
}

/// Transposes a row-major `[rows, cols]` matrix.
pub(crate) fn transpose<T: Copy>(values: &[T], rows: usize, cols: usize) -> Vec<T> {
    debug_assert_eq!(values.len(), rows * cols);
    let mut out = Vec::with_capacity(values.len());
    for col in 0..cols {
        out.extend((0..rows).map(|row| values[row * cols + col]));
    }
    out
}

/// Per tensor of θ, in order: the `[rows, cols]` of a PyTorch dense weight, which burn
/// stores transposed; `None` for tensors stored alike.
fn transposed_tensors(kind: ModelKind) -> Vec<Option<(usize, usize)>> {
    kind.layers()
        .iter()
        .flat_map(|layer| match *layer {
            Layer::Linear { d_in, d_out, .. } => [Some((d_out, d_in)), None],
            Layer::Conv2d { .. } => [None, None],
        })
        .collect()
}

/// Reads θ back from a module, in PyTorch layout. The error describes the failed read.
pub(crate) fn params_of<N: Network>(network: &N) -> Result<Vec<f32>, String> {
    let kind = N::kind();
    let mut collector = ParamCollector {
        transposed: transposed_tensors(kind),
        params: Vec::with_capacity(kind.num_params()),
        index: 0,
        error: None,
    };
    network.visit(&mut collector);
    if let Some(reason) = collector.error {
        return Err(reason);
    }
    assert_eq!(
        collector.params.len(),
        kind.num_params(),
        "the module holds exactly the tensors of the layer table"
    );
    Ok(collector.params)
}

struct ParamCollector {
    transposed: Vec<Option<(usize, usize)>>,
    params: Vec<f32>,
    index: usize,
    error: Option<String>,
}

impl ModuleVisitor for ParamCollector {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let transposed = self.transposed[self.index];
        self.index += 1;
        if self.error.is_some() {
            return;
        }

        let values = match read_f32(param.val()) {
            Ok(values) => values,
            Err(reason) => {
                self.error = Some(reason);
                return;
            }
        };
        match transposed {
            // burn's [d_in, d_out] is the transpose of PyTorch's [rows = out, cols = in].
            Some((rows, cols)) => self.params.extend(transpose(&values, cols, rows)),
            None => self.params.extend(values),
        }
    }
}

/// Copies a tensor's values to the host as f32.
pub(crate) fn read_f32<const D: usize>(tensor: Tensor<D>) -> Result<Vec<f32>, String> {
    let data = tensor
        .try_into_data()
        .map_err(|error| format!("failed to read a tensor: {error:?}"))?;
    data.try_into_vec_as::<f32>()
        .map_err(|error| format!("failed to read a tensor as f32: {error:?}"))
}

/// Module mapper that sets pruned parameters to exactly zero.
pub(crate) struct MaskApplier {
    /// Per tensor of θ: the pruned positions in burn's layout, flattened, or `None` when the
    /// tensor has no pruned position.
    pruned: Vec<Option<Tensor<1, Bool>>>,
    index: usize,
}

impl MaskApplier {
    /// Builds the mapper from keep bits in θ order; `device` is the plain (not autodiff) device.
    /// Returns `None` when nothing is pruned.
    pub(crate) fn new(kind: ModelKind, keep: &[bool], device: &Device) -> Option<Self> {
        if keep.iter().all(|&bit| bit) {
            return None;
        }

        let mut pruned = Vec::new();
        let mut offset = 0;
        for (spec, transposed) in kind.tensor_specs().iter().zip(transposed_tensors(kind)) {
            let keep = &keep[offset..offset + spec.numel()];
            offset += spec.numel();
            if keep.iter().all(|&bit| bit) {
                pruned.push(None);
                continue;
            }
            let keep = match transposed {
                Some((rows, cols)) => transpose(keep, rows, cols),
                None => keep.to_vec(),
            };
            let bits: Vec<bool> = keep.iter().map(|&bit| !bit).collect();
            let len = bits.len();
            pruned.push(Some(Tensor::from_data(
                TensorData::new(bits, [len]),
                device,
            )));
        }
        Some(MaskApplier { pruned, index: 0 })
    }

    /// Zeroes the pruned parameters of `network`.
    pub(crate) fn apply<N: Network>(&mut self, network: N) -> N {
        self.index = 0;
        network.map(self)
    }
}

impl ModuleMapper for MaskApplier {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let index = self.index;
        self.index += 1;
        let Some(pruned) = &self.pruned[index] else {
            return param;
        };

        param.map(|tensor| {
            let pruned = pruned.clone().reshape::<D, _>(tensor.shape());
            if !tensor.is_autodiff() {
                return tensor.mask_fill(pruned, 0.0);
            }
            // Masking on the inner backend keeps the parameter a leaf of the autodiff graph,
            // as the optimizer leaves it after a step.
            let require_grad = tensor.is_require_grad();
            let masked = Tensor::from_inner(tensor.inner().mask_fill(pruned, 0.0));
            masked.set_require_grad(require_grad)
        })
    }
}

/// Checks that every value is finite; the error names the first bad index and its tensor.
pub(crate) fn check_finite(kind: ModelKind, params: &[f32]) -> Result<(), ModelError> {
    match params.iter().position(|value| !value.is_finite()) {
        None => Ok(()),
        Some(index) => Err(ModelError::NonFiniteParam {
            index,
            tensor: kind.tensor_name_at(index).unwrap_or_default(),
            value: params[index],
        }),
    }
}

/// Checks the length of θ.
pub(crate) fn check_len(kind: ModelKind, params: &[f32]) -> Result<(), ModelError> {
    if params.len() != kind.num_params() {
        return Err(ModelError::ParamCount {
            model: kind.to_string(),
            expected: kind.num_params(),
            actual: params.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<N: Network>(device: &Device) {
        let kind = N::kind();
        let params = kind.init_params(3);
        let network = N::from_params(&params, device);
        let back = params_of(&network).unwrap();
        assert_eq!(back.len(), params.len());
        let identical = params
            .iter()
            .zip(&back)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(identical, "{kind}: θ changed in the round trip");
    }

    #[test]
    fn mlp_roundtrip_is_exact() {
        roundtrip::<Mlp>(&Device::flex());
        roundtrip::<Mlp>(&Device::flex().autodiff());
    }

    #[test]
    fn cnn_roundtrip_is_exact() {
        roundtrip::<Cnn>(&Device::flex());
    }

    #[test]
    fn transpose_swaps_axes() {
        // [[1, 2, 3], [4, 5, 6]] -> [[1, 4], [2, 5], [3, 6]]
        assert_eq!(transpose(&[1, 2, 3, 4, 5, 6], 2, 3), vec![1, 4, 2, 5, 3, 6]);
    }

    #[test]
    fn mlp_weight_layout_matches_pytorch() {
        // θ with fc1.weight[out = 1][in = 2] = 1 and everything else 0 must make the first
        // layer's output 1 read input pixel 2.
        let kind = ModelKind::Mlp;
        let mut params = vec![0f32; kind.num_params()];
        params[784 + 2] = 1.0;
        let device = Device::flex();
        let network = Mlp::from_params(&params, &device);

        let mut pixels = vec![0f32; 784];
        pixels[2] = 5.0;
        let input = Tensor::<2>::from_data(TensorData::new(pixels, [1, 784]), &device);
        let hidden = read_f32(network.fc1.forward(input)).unwrap();
        assert_eq!(hidden[1], 5.0);
        assert_eq!(hidden.iter().filter(|&&value| value != 0.0).count(), 1);
    }

    #[test]
    fn cnn_forward_gives_logits_per_image() {
        let device = Device::flex();
        let network = Cnn::from_params(&ModelKind::Cnn.init_params(1), &device);
        let pixels = Tensor::<2>::zeros([3, 784], &device);
        assert_eq!(network.forward(pixels).dims(), [3, 10]);
    }

    #[test]
    fn mask_applier_zeroes_pruned_positions() {
        let kind = ModelKind::Mlp;
        let params = kind.init_params(5);
        let keep: Vec<bool> = (0..params.len()).map(|index| index % 3 != 0).collect();
        let device = Device::flex();

        let mut applier = MaskApplier::new(kind, &keep, &device).unwrap();
        let network = applier.apply(Mlp::from_params(&params, &device));
        let masked = params_of(&network).unwrap();
        for (index, (&value, &original)) in masked.iter().zip(&params).enumerate() {
            if keep[index] {
                assert_eq!(value, original, "kept position {index}");
            } else {
                assert_eq!(value.to_bits(), 0, "pruned position {index} is +0.0");
            }
        }
    }

    #[test]
    fn mask_applier_skips_full_mask() {
        let kind = ModelKind::Mlp;
        let keep = vec![true; kind.num_params()];
        assert!(MaskApplier::new(kind, &keep, &Device::flex()).is_none());
    }

    #[test]
    fn check_finite_names_tensor() {
        let kind = ModelKind::Mlp;
        let mut params = vec![0f32; kind.num_params()];
        params[156_801] = f32::NAN;
        let error = check_finite(kind, &params).unwrap_err().to_string();
        assert!(error.contains("index 156801"), "{error}");
        assert!(error.contains("fc1.bias"), "{error}");
    }
}
