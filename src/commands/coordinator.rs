//! `fedcompress coordinator`: serves one run to workers that dial in.

use std::time::Instant;

use anyhow::Context;
use fedcompress_coordinator::{Checkpoint, RunHooks};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::transport::{Identity, ServerTlsConfig};
use tracing::info;

use crate::UsageError;
use crate::cli::CoordinatorArgs;
use crate::commands::prepare::prepare;
use crate::report::{MetricsWriter, write_outputs};

pub async fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    let settings = args.settings.resolve()?;
    let mut config = settings.coordinator_config()?;
    let prepared = prepare(&settings)?;
    if let Some(data) = &prepared.data {
        info!(data = %data, "using data");
    }
    config.checkpoint_dir = Some(
        args.checkpoint_dir
            .clone()
            .unwrap_or_else(|| settings.out.join("checkpoints")),
    );
    config.keep_checkpoints = args.keep_checkpoints;
    let resume = match &args.resume {
        Some(dir) => Some(Checkpoint::load_latest(dir).map_err(|e| UsageError(e.to_string()))?),
        None => None,
    };

    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| UsageError(format!("failed to listen on {}: {e}", args.listen)))?;
    let address = listener
        .local_addr()
        .context("failed to read the bound address")?;
    if let Some(path) = &args.port_file {
        crate::report::write_atomically(path, address.port().to_string().as_bytes())?;
    }

    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |path: &std::path::PathBuf, flag: &str| {
                std::fs::read(path).map_err(|e| {
                    UsageError(format!("failed to read {flag} {}: {e}", path.display()))
                })
            };
            let identity = Identity::from_pem(read(cert, "--tls-cert")?, read(key, "--tls-key")?);
            Some(ServerTlsConfig::new().identity(identity))
        }
        _ => None,
    };

    let mut metrics = MetricsWriter::create(&settings.out, args.resume.is_some())?;
    let (events, mut receiver) = mpsc::unbounded_channel();
    let hooks = RunHooks {
        resume,
        tls,
        ..prepared.hooks(events)
    };
    let started = Instant::now();
    let run = tokio::spawn(fedcompress_coordinator::run(
        listener,
        config,
        prepared.setup.clone(),
        hooks,
        super::shutdown_signal(),
    ));
    while let Some(summary) = receiver.recv().await {
        metrics.write(&summary)?;
    }
    let outcome = run.await.context("coordinator task failed")??;
    let report = write_outputs(
        &settings.out,
        &settings,
        &prepared,
        &outcome,
        started.elapsed().as_secs_f64(),
    )?;
    info!(
        rounds = report.rounds,
        accuracy = report.final_accuracy,
        reason = %report.convergence_reason,
        out = %settings.out.display(),
        "run complete"
    );
    Ok(())
}
