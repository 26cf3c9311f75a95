//! Outputs of a run: metrics.jsonl, report.json and the model files.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fedcompress_coordinator::{RoundSummary, RunOutcome};
use serde::Serialize;

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
    model: &ModelChoice,
    outcome: &RunOutcome,
    wall_seconds: f64,
    data: Option<String>,
    client_samples: BTreeMap<u32, u64>,
) -> anyhow::Result<Report> {
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

    let last = outcome.history.last();
    let report = Report {
        final_accuracy: last.and_then(|s| s.accuracy),
        final_loss: last.and_then(|s| s.loss),
        rounds: outcome.rounds,
        params_total: outcome.params.len(),
        params_kept: outcome.mask.count_kept(),
        sparsity: outcome.mask.sparsity(),
        bytes_up: outcome.traffic.bytes_up,
        bytes_down: outcome.traffic.bytes_down,
        convergence_reason: outcome.reason.to_string(),
        wall_seconds,
        model: model.kind_name(),
        data,
        client_samples,
        files,
        config: config.clone(),
    };
    let path: PathBuf = out.join("report.json");
    let text = serde_json::to_string_pretty(&report).expect("report serializes");
    write_atomically(&path, text.as_bytes())?;
    Ok(report)
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
