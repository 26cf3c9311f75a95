use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::ModelError;
use crate::nets;
use crate::spec::ModelKind;

/// Metadata key that names the model kind in the files this crate writes.
pub const MODEL_METADATA_KEY: &str = "fedcompress.model";

/// Writes θ as dense f32 tensors with PyTorch names and shapes, so that
/// `module.load_state_dict(safetensors.torch.load_file(path))` loads it into the PyTorch
/// version of the model.
///
/// The metadata gets `fedcompress.model` (the model kind) and `format: pt` (what
/// `safetensors.torch.save_file` writes) unless the caller sets them. The file is written
/// under a temporary name and renamed, so a crash never leaves a partial file at `path`.
pub fn save_safetensors(
    path: &Path,
    kind: ModelKind,
    params: &[f32],
    metadata: &BTreeMap<String, String>,
) -> Result<(), ModelError> {
    nets::check_len(kind, params)?;
    let write_error = |reason: String| ModelError::SafetensorsWrite {
        path: path.to_path_buf(),
        reason,
    };

    let mut header: HashMap<String, String> = metadata.clone().into_iter().collect();
    match header.get(MODEL_METADATA_KEY) {
        Some(value) if value != kind.name() => {
            return Err(write_error(format!(
                "metadata {MODEL_METADATA_KEY} = {value:?} contradicts the model kind {kind}; \
                 leave the key out"
            )));
        }
        Some(_) => {}
        None => {
            header.insert(MODEL_METADATA_KEY.to_string(), kind.to_string());
        }
    }
    header
        .entry("format".to_string())
        .or_insert_with(|| "pt".to_string());

    let bytes: Vec<u8> = params
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect();
    let mut views = Vec::new();
    let mut offset = 0;
    for spec in kind.tensor_specs() {
        let len = spec.numel() * size_of::<f32>();
        let view = TensorView::new(Dtype::F32, spec.shape.clone(), &bytes[offset..offset + len])
            .map_err(|error| write_error(format!("tensor `{}`: {error}", spec.name)))?;
        views.push((spec.name, view));
        offset += len;
    }
    let file = safetensors::serialize(views, Some(header))
        .map_err(|error| write_error(error.to_string()))?;

    let temp_path = temporary_path(path);
    fs::write(&temp_path, file)
        .and_then(|()| fs::rename(&temp_path, path))
        .map_err(|error| {
            // Best effort: the temporary file may not exist if the write itself failed.
            let _ = fs::remove_file(&temp_path);
            write_error(error.to_string())
        })
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Reads a file written by [`save_safetensors`] and returns the model kind and θ.
///
/// The kind comes from the metadata key `fedcompress.model`. Every tensor of that model must
/// be present as f32 with its PyTorch shape, and no other tensor may be. Values are returned
/// as stored, NaN included.
pub fn load_safetensors(path: &Path) -> Result<(ModelKind, Vec<f32>), ModelError> {
    let model = load_safetensors_with_metadata(path)?;
    Ok((model.kind, model.params))
}

/// Model read from a safetensors file.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedModel {
    pub kind: ModelKind,
    pub params: Vec<f32>,
    /// The file's metadata, `fedcompress.model` included.
    pub metadata: BTreeMap<String, String>,
}

/// Like [`load_safetensors`], and also returns the file's metadata.
pub fn load_safetensors_with_metadata(path: &Path) -> Result<LoadedModel, ModelError> {
    let invalid = |reason: String| ModelError::InvalidSafetensors {
        path: path.to_path_buf(),
        reason,
    };
    let invalid_tensor = |tensor: &str, reason: String| ModelError::InvalidSafetensorsTensor {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        reason,
    };

    let bytes = fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, header) =
        SafeTensors::read_metadata(&bytes).map_err(|error| invalid(error.to_string()))?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let kind: ModelKind = metadata
        .get(MODEL_METADATA_KEY)
        .ok_or_else(|| {
            invalid(format!(
                "missing metadata key {MODEL_METADATA_KEY}, so the model kind is unknown; \
                 was the file written by fedcompress?"
            ))
        })?
        .parse()
        .map_err(|error: ModelError| invalid(error.to_string()))?;

    let tensors = SafeTensors::deserialize(&bytes).map_err(|error| invalid(error.to_string()))?;
    let specs = kind.tensor_specs();
    if let Some(extra) = tensors
        .names()
        .into_iter()
        .find(|name| !specs.iter().any(|spec| spec.name == *name))
    {
        return Err(invalid_tensor(
            extra,
            format!("not a tensor of model {kind}"),
        ));
    }

    let mut params = Vec::with_capacity(kind.num_params());
    for spec in &specs {
        let tensor = tensors
            .tensor(&spec.name)
            .map_err(|_| invalid_tensor(&spec.name, format!("missing, model {kind} needs it")))?;
        if tensor.dtype() != Dtype::F32 {
            return Err(invalid_tensor(
                &spec.name,
                format!("dtype {:?}, expected F32", tensor.dtype()),
            ));
        }
        if tensor.shape() != spec.shape.as_slice() {
            return Err(invalid_tensor(
                &spec.name,
                format!("shape {:?}, expected {:?}", tensor.shape(), spec.shape),
            ));
        }
        params.extend(
            tensor
                .data()
                .chunks_exact(size_of::<f32>())
                .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])),
        );
    }
    Ok(LoadedModel {
        kind,
        params,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata() -> BTreeMap<String, String> {
        BTreeMap::from([("fedcompress.round".to_string(), "12".to_string())])
    }

    #[test]
    fn safetensors_roundtrip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        for kind in ModelKind::ALL {
            let path = dir.path().join(format!("{kind}.safetensors"));
            let mut params = kind.init_params(9);
            params[0] = 0.0;
            params[1] = -0.0;

            save_safetensors(&path, kind, &params, &metadata()).unwrap();
            let LoadedModel {
                kind: loaded_kind,
                params: loaded,
                metadata: meta,
            } = load_safetensors_with_metadata(&path).unwrap();

            assert_eq!(loaded_kind, kind);
            let identical = params
                .iter()
                .zip(&loaded)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                identical && params.len() == loaded.len(),
                "{kind}: θ changed"
            );
            assert_eq!(meta["fedcompress.round"], "12");
            assert_eq!(meta[MODEL_METADATA_KEY], kind.name());
            assert_eq!(meta["format"], "pt");
            assert!(!temporary_path(&path).exists());
        }
    }

    #[test]
    fn saved_tensors_have_pytorch_names_and_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mlp.safetensors");
        let kind = ModelKind::Mlp;
        let params: Vec<f32> = (0..kind.num_params()).map(|index| index as f32).collect();
        save_safetensors(&path, kind, &params, &BTreeMap::new()).unwrap();

        let bytes = fs::read(&path).unwrap();
        let tensors = SafeTensors::deserialize(&bytes).unwrap();
        let fc1 = tensors.tensor("fc1.weight").unwrap();
        assert_eq!(fc1.shape(), &[200, 784]);
        // Row-major [out, in]: element [1][0] is θ[784].
        assert_eq!(&fc1.data()[784 * 4..785 * 4], &784f32.to_le_bytes());
        assert_eq!(tensors.tensor("fc3.bias").unwrap().shape(), &[10]);
    }

    #[test]
    fn missing_tensor_names_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let data = vec![0u8; 4 * 10];
        let views = vec![(
            "fc3.bias",
            TensorView::new(Dtype::F32, vec![5, 2], &data).unwrap(),
        )];
        let header = HashMap::from([(MODEL_METADATA_KEY.to_string(), "mlp".to_string())]);
        fs::write(&path, safetensors::serialize(views, Some(header)).unwrap()).unwrap();

        let error = load_safetensors(&path).unwrap_err().to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
        // fc1.weight is checked first and is missing.
        assert!(error.contains("`fc1.weight`"), "{error}");
        assert!(error.contains("missing"), "{error}");
    }

    #[test]
    fn wrong_shape_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let kind = ModelKind::Mlp;
        let bytes: Vec<u8> = vec![0u8; kind.num_params() * 4];
        let mut views = Vec::new();
        let mut offset = 0;
        for spec in kind.tensor_specs() {
            let len = spec.numel() * 4;
            let shape = if spec.name == "fc2.weight" {
                vec![100, 400]
            } else {
                spec.shape.clone()
            };
            views.push((
                spec.name,
                TensorView::new(Dtype::F32, shape, &bytes[offset..offset + len]).unwrap(),
            ));
            offset += len;
        }
        let header = HashMap::from([(MODEL_METADATA_KEY.to_string(), "mlp".to_string())]);
        fs::write(&path, safetensors::serialize(views, Some(header)).unwrap()).unwrap();

        let error = load_safetensors(&path).unwrap_err().to_string();
        assert!(error.contains("`fc2.weight`"), "{error}");
        assert!(
            error.contains("shape [100, 400], expected [200, 200]"),
            "{error}"
        );
    }

    #[test]
    fn missing_model_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.safetensors");
        let data = vec![0u8; 4];
        let views = vec![("x", TensorView::new(Dtype::F32, vec![1], &data).unwrap())];
        fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();

        let error = load_safetensors(&path).unwrap_err().to_string();
        assert!(error.contains(MODEL_METADATA_KEY), "{error}");
        assert!(error.contains(&path.display().to_string()), "{error}");
    }

    #[test]
    fn conflicting_model_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let kind = ModelKind::Mlp;
        let metadata = BTreeMap::from([(MODEL_METADATA_KEY.to_string(), "cnn".to_string())]);
        let error = save_safetensors(
            &dir.path().join("x.safetensors"),
            kind,
            &kind.init_params(0),
            &metadata,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("contradicts the model kind mlp"), "{error}");
    }

    #[test]
    fn truncated_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mlp.safetensors");
        let kind = ModelKind::Mlp;
        save_safetensors(&path, kind, &kind.init_params(0), &BTreeMap::new()).unwrap();
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();

        let error = load_safetensors(&path).unwrap_err().to_string();
        assert!(error.contains("invalid safetensors file"), "{error}");
    }
}
