use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Compute backend for local training and evaluation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// burn's pure-Rust CPU backend.
    #[default]
    Flex,
    /// libtorch through burn-tch, on the first CUDA GPU if libtorch finds one, else on the CPU.
    /// Needs the `tch` cargo feature.
    Tch,
}

impl Backend {
    /// Name used on the command line and in configs.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Flex => "flex",
            Backend::Tch => "tch",
        }
    }

    /// Returns an error unless this build can run the backend.
    ///
    /// Parsing accepts every backend name, so that a process can relay a config for a build
    /// with other features. Call this at startup to fail early.
    pub fn ensure_available(&self) -> Result<(), ModelError> {
        match self {
            Backend::Flex => Ok(()),
            Backend::Tch if cfg!(feature = "tch") => Ok(()),
            Backend::Tch => Err(ModelError::BackendUnavailable),
        }
    }

    /// Creates the plain (not autodiff) device of the backend.
    pub fn device(&self) -> Result<Device, ModelError> {
        match self {
            Backend::Flex => Ok(Device::flex()),
            Backend::Tch => tch_device(),
        }
    }
}

#[cfg(feature = "tch")]
// burn 0.22 deprecates burn-tch in favour of CubeCL backends, but it is the libtorch route.
#[allow(deprecated)]
fn tch_device() -> Result<Device, ModelError> {
    // NOTE: not covered by the tests, which build without libtorch.
    if tch::Cuda::is_available() {
        Ok(Device::libtorch_cuda(0usize))
    } else {
        Ok(Device::libtorch())
    }
}

#[cfg(not(feature = "tch"))]
fn tch_device() -> Result<Device, ModelError> {
    Err(ModelError::BackendUnavailable)
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = ModelError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "flex" => Ok(Backend::Flex),
            "tch" => Ok(Backend::Tch),
            _ => Err(ModelError::UnknownBackend {
                value: value.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_parses_and_displays() {
        for backend in [Backend::Flex, Backend::Tch] {
            assert_eq!(backend.to_string().parse::<Backend>().unwrap(), backend);
        }
        let error = "cuda".parse::<Backend>().unwrap_err().to_string();
        assert!(error.contains("`cuda`"), "{error}");
        assert!(error.contains("flex, tch"), "{error}");
    }

    #[test]
    fn flex_is_always_available() {
        assert!(Backend::Flex.ensure_available().is_ok());
        assert!(Backend::Flex.device().is_ok());
    }

    #[cfg(not(feature = "tch"))]
    #[test]
    fn tch_without_feature_names_the_feature() {
        let error = Backend::Tch.ensure_available().unwrap_err().to_string();
        assert!(error.contains("--features tch"), "{error}");
        let error = Backend::Tch.device().unwrap_err().to_string();
        assert!(error.contains("--features tch"), "{error}");
    }
}
