//! Outputs of a run: metrics.jsonl, report.json and the model files.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fedcompress_coordinator::{RoundSummary, RunOutcome};
use serde::Serialize;

use fedcompress_core::prune::{Compaction, kept_units};
use fedcompress_core::{ShardLayout, TensorSpec, encode_sparse};
use safetensors::{Dtype, tensor::TensorView};

use crate::commands::prepare::Prepared;
use crate::settings::{ModelChoice, RunConfig};

/// Appends one JSON object per round to `metrics.jsonl`.
pub struct MetricsWriter {
    file: fs::File,
}

impl MetricsWriter {
    /// Opens `out/metrics.jsonl`; a new run truncates it, a resumed run appends.
    pub fn create(out: &Path, append: bool) -> anyhow::Result<Self> {
        fs::create_dir_all(out)
            .with_context(|| format!("failed to create output directory {}", out.display()))?;
        let path = out.join("metrics.jsonl");
        let file = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&path)
            .with_context(|| format!("failed to open {}", path.display()))?;
        Ok(Self { file })
    }

    pub fn write(&mut self, summary: &RoundSummary) -> anyhow::Result<()> {
        let line = serde_json::to_string(summary).expect("summary serializes");
        writeln!(self.file, "{line}").context("failed to append to metrics.jsonl")?;
        self.file.flush().context("failed to flush metrics.jsonl")
    }
}

/// The summary of a run written to report.json.
#[derive(Debug, Serialize)]
pub struct Report {
    pub final_accuracy: Option<f64>,
    pub final_loss: Option<f64>,
    pub rounds: u64,
    pub params_total: usize,
    pub params_kept: usize,
    /// Parameters of the compact dense model after structured pruning.
    pub params_compact: Option<usize>,
    pub sparsity: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub convergence_reason: String,
    pub wall_seconds: f64,
    pub model: String,
    pub data: Option<String>,
    /// Training samples per client id.
    pub client_samples: BTreeMap<u32, u64>,
    /// Model files written, with their sizes in bytes.
    pub files: BTreeMap<String, u64>,
    pub config: RunConfig,
}

/// Writes the model files and report.json into `out`; returns the report.
pub fn write_outputs(
    out: &Path,
    config: &RunConfig,
    prepared: &Prepared,
    outcome: &RunOutcome,
    wall_seconds: f64,
) -> anyhow::Result<Report> {
    let model = &prepared.model;
    fs::create_dir_all(out)
        .with_context(|| format!("failed to create output directory {}", out.display()))?;
    let mut files = BTreeMap::new();
    if let ModelChoice::Burn(kind) = model {
        let path = out.join("model.safetensors");
        let metadata = BTreeMap::from([
            ("rounds".to_string(), outcome.rounds.to_string()),
            (
                "params_kept".to_string(),
                outcome.mask.count_kept().to_string(),
            ),
        ]);
        fedcompress_model::save_safetensors(&path, *kind, &outcome.params, &metadata)
            .with_context(|| format!("failed to write {}", path.display()))?;
        files.insert("model.safetensors".to_string(), file_size(&path));
    }

    let tensors = model.tensors();
    let metadata = BTreeMap::from([("fedcompress.model".to_string(), model.kind_name())]);
    let sparse = encode_sparse(&tensors, &outcome.params, &outcome.mask, &metadata);
    let path = out.join("model.sparse");
    write_atomically(&path, &sparse)?;
    files.insert("model.sparse".to_string(), sparse.len() as u64);

    let mut params_compact = None;
    if let Some(groups) = prepared.prune.as_ref().and_then(|p| p.groups.as_ref()) {
        let layout = ShardLayout::new(tensors.clone(), usize::MAX)?;
        let units = kept_units(&layout, &outcome.mask, groups)?;
        let compaction = Compaction::new(&layout, groups, &units)?;
        let values = compaction.gather(&outcome.params);
        let path = out.join("model-compact.safetensors");
        write_safetensors(&path, compaction.tensors(), &values, &metadata)?;
        files.insert("model-compact.safetensors".to_string(), file_size(&path));
        params_compact = Some(compaction.total_elems());
    }

    let last = outcome.history.last();
    let report = Report {
        final_accuracy: last.and_then(|s| s.accuracy),
        final_loss: last.and_then(|s| s.loss),
        rounds: outcome.rounds,
        params_total: outcome.params.len(),
        params_kept: outcome.mask.count_kept(),
        params_compact,
        sparsity: outcome.mask.sparsity(),
        bytes_up: outcome.traffic.bytes_up,
        bytes_down: outcome.traffic.bytes_down,
        convergence_reason: outcome.reason.to_string(),
        wall_seconds,
        model: model.kind_name(),
        data: prepared.data.clone(),
        client_samples: prepared.client_samples.clone(),
        files,
        config: RunConfig {
            // The token is a secret: it stays out of files.
            token: if config.token.is_empty() {
                String::new()
            } else {
                "<redacted>".into()
            },
            ..config.clone()
        },
    };
    let path: PathBuf = out.join("report.json");
    let text = serde_json::to_string_pretty(&report).expect("report serializes");
    write_atomically(&path, text.as_bytes())?;
    Ok(report)
}

/// Writes named f32 tensors as a safetensors file in PyTorch's layout.
fn write_safetensors(
    path: &Path,
    tensors: &[TensorSpec],
    values: &[f32],
    metadata: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut views = Vec::new();
    let mut offset = 0;
    for tensor in tensors {
        let len = tensor.numel() * 4;
        let view = TensorView::new(
            Dtype::F32,
            tensor.shape.clone(),
            &bytes[offset..offset + len],
        )
        .with_context(|| format!("invalid tensor `{}`", tensor.name))?;
        views.push((tensor.name.clone(), view));
        offset += len;
    }
    let mut header: std::collections::HashMap<String, String> =
        metadata.clone().into_iter().collect();
    header.insert("format".into(), "pt".into());
    let file = safetensors::serialize(views, Some(header))
        .with_context(|| format!("failed to encode {}", path.display()))?;
    write_atomically(path, &file)
}

fn file_size(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    fs::write(&temporary, bytes)
        .with_context(|| format!("failed to write {}", temporary.display()))?;
    fs::rename(&temporary, path).with_context(|| format!("failed to write {}", path.display()))
}
