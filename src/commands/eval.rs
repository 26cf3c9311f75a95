//! `fedcompress eval`: accuracy of a saved model on the test set.

use fedcompress_model::{Backend, evaluate, load_data, load_safetensors};

use crate::UsageError;
use crate::cli::EvalArgs;

pub async fn run(args: EvalArgs) -> anyhow::Result<()> {
    let backend: Backend = args
        .backend
        .parse()
        .map_err(|e: fedcompress_model::ModelError| UsageError(e.to_string()))?;
    if args.model.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(UsageError(format!(
            "invalid model file {}: eval reads the model.safetensors a run writes (not model.sparse or a compact model)",
            args.model.display()
        ))
        .into());
    }
    let (kind, params) = load_safetensors(&args.model).map_err(|e| UsageError(e.to_string()))?;
    let (source, _train, test) =
        load_data(args.data_dir.as_deref()).map_err(|e| UsageError(e.to_string()))?;
    let result =
        tokio::task::spawn_blocking(move || evaluate(kind, &params, &test, backend)).await??;
    let line = serde_json::json!({
        "model": args.model.display().to_string(),
        "kind": kind.to_string(),
        "accuracy": result.accuracy,
        "loss": result.loss,
        "samples": result.samples,
        "data": source.description,
    });
    println!("{line}");
    Ok(())
}
