use std::fmt;
use std::str::FromStr;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Side of the square input images (MNIST family).
pub const IMAGE_SIDE: usize = 28;

/// Number of output classes (MNIST family).
pub const NUM_CLASSES: usize = 10;

/// Network architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Multilayer perceptron 784-200-200-10 with ReLU.
    Mlp,
    /// Two 5x5 convolutions (32 and 64 channels, each followed by ReLU and 2x2 max pooling),
    /// then dense layers of 512 (ReLU) and 10 units.
    Cnn,
}

/// Name and PyTorch shape of one named tensor of the parameter vector θ.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One layer with parameters, the source of the tensor specs and of the initialization.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Layer {
    Linear {
        name: &'static str,
        d_in: usize,
        d_out: usize,
    },
    Conv2d {
        name: &'static str,
        channels_in: usize,
        channels_out: usize,
        kernel: usize,
    },
}

impl Layer {
    /// PyTorch shapes of the weight and the bias.
    fn shapes(&self) -> (Vec<usize>, Vec<usize>) {
        match *self {
            Layer::Linear { d_in, d_out, .. } => (vec![d_out, d_in], vec![d_out]),
            Layer::Conv2d {
                channels_in,
                channels_out,
                kernel,
                ..
            } => (
                vec![channels_out, channels_in, kernel, kernel],
                vec![channels_out],
            ),
        }
    }

    fn name(&self) -> &'static str {
        match *self {
            Layer::Linear { name, .. } | Layer::Conv2d { name, .. } => name,
        }
    }

    fn fan_in(&self) -> usize {
        match *self {
            Layer::Linear { d_in, .. } => d_in,
            Layer::Conv2d {
                channels_in,
                kernel,
                ..
            } => channels_in * kernel * kernel,
        }
    }
}

const MLP_HIDDEN: usize = 200;
const CNN_CHANNELS: [usize; 2] = [32, 64];
const CNN_KERNEL: usize = 5;
const CNN_DENSE: usize = 512;
/// Channels x height x width after the second pooling: each 2x2 pooling halves 28 -> 14 -> 7,
/// and the convolutions keep the size because their padding is 2.
pub(crate) const CNN_FLAT: usize = CNN_CHANNELS[1] * (IMAGE_SIDE / 4) * (IMAGE_SIDE / 4);

const MLP_LAYERS: [Layer; 3] = [
    Layer::Linear {
        name: "fc1",
        d_in: IMAGE_SIDE * IMAGE_SIDE,
        d_out: MLP_HIDDEN,
    },
    Layer::Linear {
        name: "fc2",
        d_in: MLP_HIDDEN,
        d_out: MLP_HIDDEN,
    },
    Layer::Linear {
        name: "fc3",
        d_in: MLP_HIDDEN,
        d_out: NUM_CLASSES,
    },
];

const CNN_LAYERS: [Layer; 4] = [
    Layer::Conv2d {
        name: "conv1",
        channels_in: 1,
        channels_out: CNN_CHANNELS[0],
        kernel: CNN_KERNEL,
    },
    Layer::Conv2d {
        name: "conv2",
        channels_in: CNN_CHANNELS[0],
        channels_out: CNN_CHANNELS[1],
        kernel: CNN_KERNEL,
    },
    Layer::Linear {
        name: "fc1",
        d_in: CNN_FLAT,
        d_out: CNN_DENSE,
    },
    Layer::Linear {
        name: "fc2",
        d_in: CNN_DENSE,
        d_out: NUM_CLASSES,
    },
];

impl ModelKind {
    /// Every model kind, in a fixed order.
    pub const ALL: [ModelKind; 2] = [ModelKind::Mlp, ModelKind::Cnn];

    /// Name used on the command line, in configs and in safetensors metadata.
    pub fn name(&self) -> &'static str {
        match self {
            ModelKind::Mlp => "mlp",
            ModelKind::Cnn => "cnn",
        }
    }

    pub(crate) fn layers(&self) -> &'static [Layer] {
        match self {
            ModelKind::Mlp => &MLP_LAYERS,
            ModelKind::Cnn => &CNN_LAYERS,
        }
    }

    /// Named tensors of θ in their fixed order, with PyTorch names and shapes: a weight is
    /// `[out, in]` for a dense layer and `[out, in, kh, kw]` for a convolution, each followed
    /// by its bias.
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        let mut specs = Vec::with_capacity(2 * self.layers().len());
        for layer in self.layers() {
            let (weight_shape, bias_shape) = layer.shapes();
            specs.push(TensorSpec {
                name: format!("{}.weight", layer.name()),
                shape: weight_shape,
            });
            specs.push(TensorSpec {
                name: format!("{}.bias", layer.name()),
                shape: bias_shape,
            });
        }
        specs
    }

    /// Length of θ.
    pub fn num_params(&self) -> usize {
        self.tensor_specs().iter().map(TensorSpec::numel).sum()
    }

    /// Returns the name of the tensor that contains position `index` of θ, if it is in range.
    pub fn tensor_name_at(&self, index: usize) -> Option<String> {
        let mut end = 0;
        for spec in self.tensor_specs() {
            end += spec.numel();
            if index < end {
                return Some(spec.name);
            }
        }
        None
    }

    /// Draws an initial θ as PyTorch's default initialization does for `nn.Linear` and
    /// `nn.Conv2d`: weights and biases uniform in ±1/√fan_in. The same seed gives the same θ
    /// on every machine.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        // NOTE: the uniform values are computed from raw ChaCha8 output, which rand_chacha 0.9
        // documents as portable, and rand_core treats a change of `seed_from_u64` as
        // value-breaking. rand's distributions make no such promise across versions.
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = Vec::with_capacity(self.num_params());
        for layer in self.layers() {
            let bound = 1.0 / (layer.fan_in() as f64).sqrt();
            let (weight_shape, bias_shape) = layer.shapes();
            let count = weight_shape.iter().product::<usize>() + bias_shape[0];
            for _ in 0..count {
                // 24 random bits give a value in [0, 1) on a grid of step 2^-24.
                let unit = f64::from(rng.next_u32() >> 8) / f64::from(1u32 << 24);
                params.push(((2.0 * unit - 1.0) * bound) as f32);
            }
        }
        params
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ModelKind {
    type Err = ModelError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        ModelKind::ALL
            .into_iter()
            .find(|kind| kind.name() == value)
            .ok_or_else(|| ModelError::UnknownModel {
                value: value.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_counts_match_pytorch() {
        assert_eq!(ModelKind::Mlp.num_params(), 199_210);
        assert_eq!(ModelKind::Cnn.num_params(), 1_663_370);
    }

    #[test]
    fn tensor_specs_use_pytorch_names_and_shapes() {
        let mlp: Vec<(String, Vec<usize>)> = ModelKind::Mlp
            .tensor_specs()
            .into_iter()
            .map(|spec| (spec.name, spec.shape))
            .collect();
        assert_eq!(
            mlp,
            vec![
                ("fc1.weight".to_string(), vec![200, 784]),
                ("fc1.bias".to_string(), vec![200]),
                ("fc2.weight".to_string(), vec![200, 200]),
                ("fc2.bias".to_string(), vec![200]),
                ("fc3.weight".to_string(), vec![10, 200]),
                ("fc3.bias".to_string(), vec![10]),
            ]
        );

        let cnn: Vec<(String, Vec<usize>)> = ModelKind::Cnn
            .tensor_specs()
            .into_iter()
            .map(|spec| (spec.name, spec.shape))
            .collect();
        assert_eq!(
            cnn,
            vec![
                ("conv1.weight".to_string(), vec![32, 1, 5, 5]),
                ("conv1.bias".to_string(), vec![32]),
                ("conv2.weight".to_string(), vec![64, 32, 5, 5]),
                ("conv2.bias".to_string(), vec![64]),
                ("fc1.weight".to_string(), vec![512, 3136]),
                ("fc1.bias".to_string(), vec![512]),
                ("fc2.weight".to_string(), vec![10, 512]),
                ("fc2.bias".to_string(), vec![10]),
            ]
        );
    }

    #[test]
    fn init_params_is_deterministic_and_bounded() {
        for kind in ModelKind::ALL {
            let first = kind.init_params(7);
            assert_eq!(first.len(), kind.num_params());
            assert_eq!(first, kind.init_params(7), "{kind}: same seed");
            assert_ne!(first, kind.init_params(8), "{kind}: other seed");

            let mut offset = 0;
            for layer in kind.layers() {
                let bound = (1.0 / (layer.fan_in() as f64).sqrt()) as f32;
                let (weight_shape, bias_shape) = layer.shapes();
                let count = weight_shape.iter().product::<usize>() + bias_shape[0];
                let values = &first[offset..offset + count];
                assert!(
                    values.iter().all(|v| v.abs() <= bound),
                    "{kind} {}: bound {bound}",
                    layer.name()
                );
                // A uniform draw reaches close to its bound; a wrong fan-in would not.
                let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(max > 0.9 * bound, "{kind} {}: max {max}", layer.name());
                offset += count;
            }
        }
    }

    #[test]
    fn model_kind_parses_and_displays() {
        for kind in ModelKind::ALL {
            assert_eq!(kind.to_string().parse::<ModelKind>().unwrap(), kind);
        }
        let error = "resnet".parse::<ModelKind>().unwrap_err().to_string();
        assert!(error.contains("resnet"), "{error}");
        assert!(error.contains("mlp, cnn"), "{error}");
    }

    #[test]
    fn model_kind_serde_is_lowercase() {
        assert_eq!(serde_json::to_string(&ModelKind::Cnn).unwrap(), "\"cnn\"");
        let kind: ModelKind = serde_json::from_str("\"mlp\"").unwrap();
        assert_eq!(kind, ModelKind::Mlp);
    }

    #[test]
    fn tensor_name_at_finds_the_tensor() {
        assert_eq!(ModelKind::Mlp.tensor_name_at(0).unwrap(), "fc1.weight");
        assert_eq!(ModelKind::Mlp.tensor_name_at(156_800).unwrap(), "fc1.bias");
        assert_eq!(ModelKind::Mlp.tensor_name_at(199_209).unwrap(), "fc3.bias");
        assert_eq!(ModelKind::Mlp.tensor_name_at(199_210), None);
    }
}
