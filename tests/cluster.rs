//! End to end: a coordinator and three worker processes on 127.0.0.1 run rounds over a
//! model of more than 64 MiB, and every round's aggregate is checked bit for bit against a
//! sample-weighted mean computed here.

mod common;

use std::time::Duration;

use common::{Process, read_log, wait_for_port};
use fedcompress_coordinator::Checkpoint;
use fedcompress_core::Mask;
use fedcompress_worker::{LocalSettings, LocalUpdate, SyntheticUpdate};

/// Named tensors of several shapes: a scalar, a vector, a 4-d tensor, and matrices larger
/// than 4 MiB that the 1 Mi-element shard limit splits; 17.25 Mi values (69 MB) in all.
const MODEL: &str = "synthetic:big=4096x1100,conv=64x32x5x5,scale=scalar,emb=3000x1500,bias=1000,w2=2048x2048,w3=1000x4000";
const SEED: u64 = 11;
const ROUNDS: u64 = 3;
const LR: f64 = 0.3;
const EPOCHS: u32 = 2;

#[test]
fn cluster_aggregates_exact_weighted_mean() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path();
    let port_file = dir.path().join("port");
    let checkpoints = dir.path().join("checkpoints");
    let out = dir.path().join("out");
    let rounds = ROUNDS.to_string();
    let lr = LR.to_string();
    let epochs = EPOCHS.to_string();
    let seed = SEED.to_string();

    let mut coordinator = Process::spawn(
        "coordinator",
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            port_file.to_str().unwrap(),
            "--model",
            MODEL,
            "--clients",
            "3",
            "--workers",
            "3",
            "--rounds",
            &rounds,
            "--lr",
            &lr,
            "--local-epochs",
            &epochs,
            "--seed",
            &seed,
            "--checkpoint-dir",
            checkpoints.to_str().unwrap(),
            "--keep-checkpoints",
            "0",
            "--out",
            out.to_str().unwrap(),
        ],
        logs,
    );
    let port = wait_for_port(&port_file, Duration::from_secs(30));
    let address = format!("http://127.0.0.1:{port}");

    let mut workers: Vec<Process> = (0..3)
        .map(|i| {
            let name = format!("worker-{i}");
            let client = i.to_string();
            Process::spawn(
                &name,
                &[
                    "worker",
                    "--coordinator",
                    &address,
                    "--name",
                    &name,
                    "--clients",
                    &client,
                    "--model",
                    "synthetic",
                    "--seed",
                    &seed,
                ],
                logs,
            )
        })
        .collect();

    let status = coordinator.wait(Duration::from_secs(300));
    assert!(
        status.success(),
        "coordinator failed:\n{}",
        read_log(logs, "coordinator")
    );
    for worker in &mut workers {
        let status = worker.wait(Duration::from_secs(60));
        assert!(
            status.success(),
            "{} failed:\n{}",
            worker.name,
            read_log(logs, &worker.name)
        );
    }

    // Recompute every round from the previous checkpoint (zeros before round 1).
    let clients: Vec<(u32, u64)> = (0..3)
        .map(|c| SyntheticUpdate::new(&[c], SEED).clients()[0])
        .collect();
    let total_weight: u64 = clients.iter().map(|(_, n)| n).sum();
    let mut previous: Vec<f32> = Vec::new();
    for round in 1..=ROUNDS {
        let checkpoint = Checkpoint::load(&checkpoints.join(format!("round-{round:06}.ckpt")))
            .unwrap_or_else(|e| panic!("checkpoint of round {round}: {e}"));
        if previous.is_empty() {
            previous = vec![0.0; checkpoint.params.len()];
            assert!(previous.len() * 4 > 64 << 20, "model must exceed 64 MiB");
        }
        let mask = Mask::all_kept(previous.len());
        let settings = LocalSettings {
            round,
            epochs: EPOCHS,
            lr: LR,
            batch_size: 32,
            optimizer: "sgd".into(),
            momentum: 0.9,
            local_tol: 0.0,
            seed: 0,
        };
        let mut sum = vec![0.0f64; previous.len()];
        for &(client, weight) in &clients {
            let trained = SyntheticUpdate::new(&[client], SEED)
                .train(client, &previous, &mask, &settings)
                .unwrap();
            for ((acc, t), g) in sum.iter_mut().zip(&trained).zip(&previous) {
                *acc += weight as f64 * (t - g) as f64;
            }
        }
        let expected: Vec<f32> = previous
            .iter()
            .zip(&sum)
            .map(|(&p, &s)| (p as f64 + s / total_weight as f64) as f32)
            .collect();

        let mismatch = expected
            .iter()
            .zip(&checkpoint.params)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(
            mismatch, None,
            "round {round}: aggregate differs from the weighted mean at index {mismatch:?}"
        );
        assert_eq!(checkpoint.header.round, round);
        previous = checkpoint.params;
    }

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["rounds"], ROUNDS);
    assert_eq!(report["convergence_reason"], "round_limit");
    let model_bytes = previous.len() as u64 * 4;
    let bytes_down = report["bytes_down"].as_u64().unwrap();
    let bytes_up = report["bytes_up"].as_u64().unwrap();
    // Every round, each of the 3 workers downloads and uploads the whole dense model.
    assert!(
        bytes_down >= 3 * ROUNDS * model_bytes,
        "bytes_down {bytes_down}"
    );
    assert!(bytes_up >= 3 * ROUNDS * model_bytes, "bytes_up {bytes_up}");
    assert!(
        bytes_down < 3 * ROUNDS * model_bytes * 101 / 100,
        "bytes_down {bytes_down}"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count() as u64, ROUNDS);
}
