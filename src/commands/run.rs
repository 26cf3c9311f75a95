//! `fedcompress run`: a coordinator in this process and worker processes on loopback.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use fedcompress_coordinator::RoundSummary;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::UsageError;
use crate::cli::RunArgs;
use crate::commands::prepare::prepare;
use crate::report::{MetricsWriter, write_outputs};
use crate::settings::{ModelChoice, RunConfig};

/// Time worker processes get to leave after the run before they are killed.
const WORKER_EXIT_GRACE: Duration = Duration::from_secs(15);

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let settings = args.settings.resolve()?;
    let mut config = settings.coordinator_config()?;
    let prepared = prepare(&settings)?;
    config.checkpoint_dir = Some(settings.out.join("checkpoints"));
    println!(
        "fedcompress run: model {} ({} parameters), {} clients on {} workers, {} rounds",
        settings.model,
        prepared.setup.initial.len(),
        settings.clients,
        settings.workers,
        settings.rounds
    );
    if let Some(data) = &prepared.data {
        println!("data: {data}");
        let counts: Vec<u64> = prepared.client_samples.values().copied().collect();
        println!("samples per client: {counts:?}");
    }

    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("failed to listen on 127.0.0.1")?;
    let address = listener
        .local_addr()
        .context("failed to read the bound address")?;
    let mut metrics = MetricsWriter::create(&settings.out, false)?;
    let (events, mut receiver) = mpsc::unbounded_channel();
    let hooks = prepared.hooks(events);
    let started = Instant::now();
    let shutdown = super::shutdown_signal();
    let coordinator = tokio::spawn(fedcompress_coordinator::run(
        listener,
        config,
        prepared.setup.clone(),
        hooks,
        shutdown,
    ));
    let mut workers = spawn_workers(&settings, &prepared.model, &format!("http://{address}"))?;

    let bar = if args.no_progress {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(settings.rounds)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} round {pos}/{len} [{elapsed_precise}] {msg}")
            .expect("progress template is valid"),
    );
    while let Some(summary) = receiver.recv().await {
        metrics.write(&summary)?;
        let line = format_round(&summary);
        bar.suspend(|| println!("{line}"));
        bar.set_position(summary.round);
    }
    bar.finish_and_clear();

    let outcome = coordinator.await.context("coordinator task failed")?;
    stop_workers(&mut workers).await;
    let outcome = outcome.context("the run failed")?;
    let report = write_outputs(
        &settings.out,
        &settings,
        &prepared,
        &outcome,
        started.elapsed().as_secs_f64(),
    )?;
    println!(
        "done: {} rounds ({}), accuracy {}, {} of {} parameters kept, {} bytes up, {} bytes down, {:.1} s",
        report.rounds,
        report.convergence_reason,
        report
            .final_accuracy
            .map_or("n/a".to_string(), |a| format!("{:.4}", a)),
        report.params_kept,
        report.params_total,
        report.bytes_up,
        report.bytes_down,
        report.wall_seconds
    );
    println!("outputs in {}", settings.out.display());
    if outcome.reason == fedcompress_coordinator::StopReason::Shutdown {
        anyhow::bail!("the run was interrupted after {} rounds", report.rounds);
    }
    Ok(())
}

fn format_round(summary: &RoundSummary) -> String {
    format!(
        "round {:>3}  accuracy {}  loss {}  sparsity {:.3}  up {:>11} B  down {:>11} B  {:6.1} s",
        summary.round,
        summary
            .accuracy
            .map_or("   n/a".to_string(), |a| format!("{a:.4}")),
        summary
            .loss
            .map_or("   n/a".to_string(), |l| format!("{l:.4}")),
        summary.sparsity,
        summary.bytes_up,
        summary.bytes_down,
        summary.seconds
    )
}

/// Starts one worker process per worker, spreading client ids round-robin.
fn spawn_workers(
    settings: &RunConfig,
    model: &ModelChoice,
    address: &str,
) -> anyhow::Result<Vec<Child>> {
    let executable = std::env::current_exe().context("failed to locate the fedcompress binary")?;
    let model_name = model.kind_name();
    let mut children = Vec::new();
    for worker in 0..settings.workers {
        let clients: Vec<String> = (0..settings.clients)
            .filter(|c| c % settings.workers == worker)
            .map(|c| c.to_string())
            .collect();
        if clients.is_empty() {
            return Err(UsageError(format!("worker {worker} would host no clients")).into());
        }
        let mut command = Command::new(&executable);
        command
            .arg("worker")
            .args(["--coordinator", address])
            .args(["--name", &format!("worker-{worker}")])
            .args(["--clients", &clients.join(",")])
            .args(["--model", &model_name])
            .args(["--num-clients", &settings.clients.to_string()])
            .args(["--partition", &settings.partition])
            .args(["--seed", &settings.seed.to_string()])
            .args(["--backend", &settings.backend])
            .env("FEDCOMPRESS_TOKEN", &settings.token)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(dir) = &settings.data_dir {
            command.arg("--data-dir").arg(dir);
        }
        if std::env::var_os("FEDCOMPRESS_LOG").is_none() {
            command.env("FEDCOMPRESS_LOG", "warn");
        }
        children.push(
            command
                .spawn()
                .with_context(|| format!("failed to start worker {worker}"))?,
        );
    }
    Ok(children)
}

async fn stop_workers(workers: &mut [Child]) {
    let deadline = tokio::time::Instant::now() + WORKER_EXIT_GRACE;
    for child in workers.iter_mut() {
        if tokio::time::timeout_at(deadline, child.wait())
            .await
            .is_err()
        {
            tracing::warn!("worker did not exit in time; killing it");
            let _ = child.kill().await;
        }
    }
}
