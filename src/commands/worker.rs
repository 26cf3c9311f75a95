//! `fedcompress worker`: joins a coordinator and trains the clients it hosts.

use std::sync::Arc;

use anyhow::Context;
use fedcompress_model::{Backend, ModelKind, Partition, load_data, partition};
use fedcompress_worker::burn::BurnUpdate;
use fedcompress_worker::retry::RetryPolicy;
use fedcompress_worker::{LocalUpdate, SyntheticUpdate, WorkerConfig};
use tracing::info;

use crate::UsageError;
use crate::cli::WorkerArgs;

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let workload = build_workload(&args)?;
    let config = WorkerConfig {
        coordinator: args.coordinator.clone(),
        name: args.name.clone(),
        token: args.token.clone(),
        tls: None,
        retry: RetryPolicy {
            attempts: args.connect_attempts.max(1),
            ..RetryPolicy::default()
        },
    };
    let outcome = fedcompress_worker::run(config, workload, super::shutdown_signal())
        .await
        .with_context(|| format!("worker `{}` failed", args.name))?;
    info!(
        rounds = outcome.rounds,
        updates_sent = outcome.updates_sent,
        updates_rejected = outcome.updates_rejected,
        bytes_up = outcome.bytes_up,
        bytes_down = outcome.bytes_down,
        reason = %outcome.finish_reason,
        "worker stopped"
    );
    Ok(())
}

fn build_workload(args: &WorkerArgs) -> anyhow::Result<Arc<dyn LocalUpdate>> {
    if args.model == "synthetic" {
        return Ok(Arc::new(SyntheticUpdate::new(&args.clients, args.seed)));
    }
    let kind: ModelKind = args
        .model
        .parse()
        .map_err(|e: fedcompress_model::ModelError| UsageError(e.to_string()))?;
    let backend: Backend = args
        .backend
        .parse()
        .map_err(|e: fedcompress_model::ModelError| UsageError(e.to_string()))?;
    let scheme: Partition = args
        .partition
        .parse()
        .map_err(|e: fedcompress_model::ModelError| UsageError(e.to_string()))?;
    let num_clients = args.num_clients.ok_or_else(|| {
        UsageError("missing --num-clients: the worker needs the run's total client count to partition the data".into())
    })?;
    if let Some(bad) = args.clients.iter().find(|&&c| c as usize >= num_clients) {
        return Err(UsageError(format!(
            "invalid --clients: client {bad} is not below --num-clients {num_clients}"
        ))
        .into());
    }

    let (source, train, _test) =
        load_data(args.data_dir.as_deref()).map_err(|e| UsageError(e.to_string()))?;
    info!(data = %source.description, "training data loaded");
    let parts = partition(&train.labels, num_clients, &scheme, args.seed)
        .map_err(|e| UsageError(e.to_string()))?;
    let partitions = args
        .clients
        .iter()
        .map(|&c| (c, parts[c as usize].clone()))
        .collect();
    Ok(Arc::new(BurnUpdate::new(
        kind,
        backend,
        Arc::new(train),
        partitions,
    )))
}
