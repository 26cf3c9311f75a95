//! End to end: pruning during a federated run on the shipped subset. Checks the kept count,
//! exact zeros in the saved model, the cut in bytes on the wire, `fedcompress eval`, the
//! PyTorch layout (numpy forward pass), structured export, and bad pruning settings.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::run_to_end;
use fedcompress_core::decode_sparse;

fn subset_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist-subset")
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn run_pruned(out: &Path, rounds: &str, extra: &[&str]) -> serde_json::Value {
    let data = subset_dir();
    let mut args = vec![
        "run",
        "--model",
        "mlp",
        "--clients",
        "4",
        "--workers",
        "2",
        "--rounds",
        rounds,
        "--data-dir",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    let output = run_to_end(&args, Duration::from_secs(300));
    assert!(
        output.status.success(),
        "run failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    read_json(&out.join("report.json"))
}

#[test]
fn prune_to_ninety_percent_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let report = run_pruned(&out, "8", &["--target-sparsity", "0.9"]);

    // 198,600 weights pruned to 10 % (19,860 kept), plus the 610 unpruned biases.
    let weights = 784 * 200 + 200 * 200 + 200 * 10;
    let biases = 200 + 200 + 10;
    let kept = report["params_kept"].as_u64().unwrap();
    assert_eq!(kept, (weights as f64 * 0.1).round() as u64 + biases);
    assert_eq!(report["params_total"], 199_210);

    // The sparse file's mask and the dense file agree: every pruned position is exactly 0.
    let sparse = decode_sparse(&std::fs::read(out.join("model.sparse")).unwrap()).unwrap();
    assert_eq!(sparse.mask.count_kept() as u64, kept);
    let (_, dense) = fedcompress_model::load_safetensors(&out.join("model.safetensors")).unwrap();
    for (index, value) in dense.iter().enumerate() {
        if !sparse.mask.get(index) {
            assert_eq!(
                value.to_bits(),
                0.0f32.to_bits(),
                "pruned parameter {index} is {value}"
            );
        }
        assert_eq!(value.to_bits(), sparse.params[index].to_bits());
    }
    let dense_bytes = report["files"]["model.safetensors"].as_u64().unwrap();
    let sparse_bytes = report["files"]["model.sparse"].as_u64().unwrap();
    assert!(
        sparse_bytes * 5 < dense_bytes,
        "sparse file {sparse_bytes} B vs dense {dense_bytes} B"
    );

    // Once the schedule (rounds 2 to 6) is over, downloads carry only the kept values.
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first_down = metrics[0]["bytes_down"].as_u64().unwrap();
    let last_down = metrics[7]["bytes_down"].as_u64().unwrap();
    let first_up = metrics[0]["bytes_up"].as_u64().unwrap();
    let last_up = metrics[7]["bytes_up"].as_u64().unwrap();
    assert!(
        last_down * 8 < first_down,
        "download {first_down} B -> {last_down} B"
    );
    assert!(last_up * 8 < first_up, "upload {first_up} B -> {last_up} B");
    assert_eq!(metrics[1]["pruned"], true);
    assert_eq!(metrics[7]["pruned"], false);

    // `fedcompress eval` reproduces the reported accuracy.
    let model = out.join("model.safetensors");
    let data = subset_dir();
    let output = run_to_end(
        &[
            "eval",
            model.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let eval: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(eval["accuracy"], report["final_accuracy"]);
    assert_eq!(eval["samples"], 1000);
}

/// The safetensors file follows PyTorch's layout: names and shapes match the module's
/// state dict, and a numpy forward pass with PyTorch's conventions gives the reported
/// accuracy.
#[test]
fn saved_model_matches_pytorch_layout() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let report = run_pruned(
        &out,
        "3",
        &["--target-sparsity", "0.5", "--prune-steps", "2"],
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_torch_layout.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(out.join("model.safetensors"))
        .arg("--data-dir")
        .arg(subset_dir())
        .output()
        .expect(
            "python3 must be installed (with numpy and safetensors: pip install numpy safetensors)",
        );
    assert!(
        output.status.success(),
        "layout check failed (needs `pip install numpy safetensors`):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let check: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let numpy = check["numpy_accuracy"].as_f64().unwrap();
    let reported = report["final_accuracy"].as_f64().unwrap();
    // Float summation order differs between burn and numpy; a couple of the 1000 test
    // images near a decision boundary may flip.
    assert!(
        (numpy - reported).abs() <= 0.003,
        "numpy {numpy} vs reported {reported}"
    );
    let pruned = report["params_total"].as_u64().unwrap() - report["params_kept"].as_u64().unwrap();
    assert!(check["zeros"].as_u64().unwrap() >= pruned);
}

#[test]
fn structured_pruning_exports_smaller_dense_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let report = run_pruned(
        &out,
        "8",
        &["--target-sparsity", "0.5", "--structure", "neurons"],
    );
    let compact = report["params_compact"].as_u64().unwrap();
    assert!(
        compact < 199_210 * 6 / 10,
        "compact model has {compact} parameters"
    );
    assert_eq!(compact, report["params_kept"].as_u64().unwrap());

    let bytes = std::fs::read(out.join("model-compact.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shape = |name: &str| tensors.tensor(name).unwrap().shape().to_vec();
    let hidden1 = shape("fc1.weight")[0];
    let hidden2 = shape("fc2.weight")[0];
    assert_eq!(hidden1, 100, "half of the 200 first-layer neurons remain");
    assert_eq!(hidden2, 100);
    assert_eq!(shape("fc1.weight"), vec![hidden1, 784]);
    assert_eq!(shape("fc1.bias"), vec![hidden1]);
    assert_eq!(shape("fc2.weight"), vec![hidden2, hidden1]);
    assert_eq!(shape("fc3.weight"), vec![10, hidden2]);
    let total: usize = tensors
        .tensors()
        .iter()
        .map(|(_, t)| t.shape().iter().product::<usize>())
        .sum();
    assert_eq!(total as u64, compact);
}

#[test]
fn bad_pruning_settings_exit_with_2() {
    let data = subset_dir();
    let cases: &[(&[&str], &str)] = &[
        (&["--target-sparsity", "1.0"], "1"),
        (&["--target-sparsity=-0.1"], "-0.1"),
        (&["--target-params", "5000000"], "5000000"),
        (
            &["--target-sparsity", "0.5", "--structure", "channels"],
            "channels",
        ),
        (
            &[
                "--model",
                "cnn",
                "--target-sparsity",
                "0.5",
                "--structure",
                "neurons",
            ],
            "neurons",
        ),
        (
            &["--target-sparsity", "0.5", "--structure", "filters"],
            "filters",
        ),
    ];
    for (flags, named) in cases {
        let mut args = vec!["run", "--data-dir", data.to_str().unwrap()];
        args.extend_from_slice(flags);
        let output = run_to_end(&args, Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flags:?}:\n{stderr}");
        assert!(
            stderr.contains(named),
            "{flags:?}: `{named}` not named:\n{stderr}"
        );
    }
}
