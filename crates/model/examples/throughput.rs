//! Measures local training throughput: one epoch of `train_local` on the first SAMPLES
//! training images, then the test accuracy of the result.
//!
//! Usage: cargo run --release -p fedcompress-model --example throughput -- MODEL SAMPLES BATCH [BACKEND]
//!
//! MODEL is mlp or cnn, BACKEND flex (default) or tch. The data directory is found as the
//! CLI finds it without `--data-dir`: FEDCOMPRESS_DATA, then the system package, then the
//! subset in the repository.

use std::process::ExitCode;
use std::time::Instant;

use fedcompress_model::{Backend, LocalTrainConfig, ModelKind, evaluate, load_data, train_local};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            eprintln!("usage: throughput MODEL SAMPLES BATCH [BACKEND]");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !(3..=4).contains(&args.len()) {
        return Err(format!("expected 3 or 4 arguments, got {}", args.len()));
    }
    let kind: ModelKind = args[0].parse().map_err(|error| format!("{error}"))?;
    let samples: usize = args[1]
        .parse()
        .map_err(|_| format!("invalid SAMPLES `{}`: expected a whole number", args[1]))?;
    let batch_size: usize = args[2]
        .parse()
        .map_err(|_| format!("invalid BATCH `{}`: expected a whole number", args[2]))?;
    let backend: Backend = match args.get(3) {
        Some(name) => name.parse().map_err(|error| format!("{error}"))?,
        None => Backend::Flex,
    };
    backend
        .ensure_available()
        .map_err(|error| error.to_string())?;

    let (source, train, test) = load_data(None).map_err(|error| error.to_string())?;
    if samples == 0 || samples > train.len() {
        return Err(format!(
            "invalid SAMPLES {samples}: the training set has {} images",
            train.len()
        ));
    }
    println!("data: {}", source.description);

    let params = kind.init_params(0);
    let indices: Vec<usize> = (0..samples).collect();
    let cfg = LocalTrainConfig {
        lr: 0.01,
        batch_size,
        epochs: 1,
        backend,
        ..LocalTrainConfig::default()
    };

    let started = Instant::now();
    let result = train_local(kind, &params, None, &train, &indices, &cfg, &mut |_, _| {})
        .map_err(|error| error.to_string())?;
    let train_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let eval = evaluate(kind, &result.params, &test, backend).map_err(|error| error.to_string())?;
    let eval_seconds = started.elapsed().as_secs_f64();

    println!(
        "{kind} on {backend}, batch {batch_size}: trained {samples} samples in {train_seconds:.2} s \
         = {:.0} samples/s, loss {:.4}",
        samples as f64 / train_seconds,
        result.mean_loss
    );
    println!(
        "evaluated {} test samples in {eval_seconds:.2} s = {:.0} samples/s, accuracy {:.4}",
        eval.samples,
        eval.samples as f64 / eval_seconds,
        eval.accuracy
    );
    Ok(())
}
