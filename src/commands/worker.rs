//! `fedcompress worker`: joins a coordinator and trains the clients it hosts.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fedcompress_core::{ClientId, Mask, TensorSpec};
use fedcompress_model::{Backend, ModelKind, Partition, load_data, partition};
use fedcompress_worker::burn::BurnUpdate;
use fedcompress_worker::retry::RetryPolicy;
use fedcompress_worker::{LocalSettings, LocalUpdate, SyntheticUpdate, WorkerConfig};
use tonic::transport::{Certificate, ClientTlsConfig};
use tracing::info;

use crate::UsageError;
use crate::cli::WorkerArgs;

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let mut workload = build_workload(&args)?;
    if args.train_delay_ms > 0 {
        workload = Arc::new(Delayed {
            inner: workload,
            delay: Duration::from_millis(args.train_delay_ms),
        });
    }
    let tls = match &args.tls_ca {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                UsageError(format!("failed to read --tls-ca {}: {e}", path.display()))
            })?;
            Some(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(pem))
                    .domain_name(args.tls_domain.clone()),
            )
        }
        None => None,
    };
    let config = WorkerConfig {
        coordinator: args.coordinator.clone(),
        name: args.name.clone(),
        token: args.token.clone(),
        tls,
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
        let workload = match args.samples {
            Some(samples) => SyntheticUpdate::with_samples(
                args.clients.iter().map(|&c| (c, samples)).collect(),
                args.seed,
            ),
            None => SyntheticUpdate::new(&args.clients, args.seed),
        };
        return Ok(Arc::new(workload));
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

/// A workload that sleeps before each local update: a slow client for fault tests.
struct Delayed {
    inner: Arc<dyn LocalUpdate>,
    delay: Duration,
}

impl LocalUpdate for Delayed {
    fn clients(&self) -> Vec<(ClientId, u64)> {
        self.inner.clients()
    }

    fn check_model(&self, kind: &str, tensors: &[TensorSpec]) -> anyhow::Result<()> {
        self.inner.check_model(kind, tensors)
    }

    fn train(
        &self,
        client: ClientId,
        params: &[f32],
        mask: &Mask,
        settings: &LocalSettings,
    ) -> anyhow::Result<Vec<f32>> {
        std::thread::sleep(self.delay);
        self.inner.train(client, params, mask, settings)
    }
}
