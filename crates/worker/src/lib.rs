//! The fedcompress worker: joins a coordinator, runs the local updates of its clients and
//! uploads their compressed updates.

pub mod burn;
mod download;
pub mod retry;
pub mod update;
pub mod upload;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fedcompress_core::{ClientId, Quantization, ShardLayout, TensorSpec};
use fedcompress_proto::pb;
use fedcompress_proto::pb::coordinator_client::CoordinatorClient;
use tokio::sync::watch;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};
use tracing::{debug, info, warn};

pub use update::{LocalSettings, LocalUpdate, SyntheticUpdate};

use crate::retry::RetryPolicy;

/// HTTP/2 flow-control window per stream and per connection, in bytes: large enough for many
/// 1 MiB chunks in flight, as on the coordinator's side.
const HTTP2_WINDOW_BYTES: u32 = 16 << 20;

/// How long a GetTask long poll may wait on the coordinator.
const TASK_WAIT: Duration = Duration::from_secs(10);

/// Connection settings of a worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Address of the coordinator, such as `http://127.0.0.1:50051`.
    pub coordinator: String,
    /// Stable name; a restarted worker with the same name takes its old place.
    pub name: String,
    pub token: String,
    /// TLS settings; plain TCP when `None`.
    pub tls: Option<ClientTlsConfig>,
    /// Retries of connecting and of calls that failed with a transient status.
    pub retry: RetryPolicy,
}

/// Counts of a worker's run: rounds, updates and bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerOutcome {
    pub rounds: u64,
    pub updates_sent: u64,
    pub updates_rejected: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Reason the coordinator gave for the end of the run.
    pub finish_reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid coordinator address `{address}`: {reason}")]
    Address { address: String, reason: String },
    #[error("failed to reach the coordinator at {address} after {attempts} attempts: {source}")]
    Connect {
        address: String,
        attempts: u32,
        source: tonic::transport::Error,
    },
    #[error("join failed ({code:?}): {message}")]
    JoinRejected { code: Code, message: String },
    #[error("the coordinator announced an unusable model: {0}")]
    Model(String),
    #[error("call `{call}` failed: {status}")]
    Call { call: &'static str, status: Status },
    #[error(transparent)]
    Download(#[from] download::DownloadError),
}

/// The session of a joined worker.
struct Session {
    client: CoordinatorClient<Channel>,
    worker_id: u64,
    session: String,
    layout: ShardLayout,
    heartbeat: Duration,
    chunk_bytes: usize,
}

/// Runs a worker until the coordinator ends the run or `shutdown` turns true.
pub async fn run(
    config: WorkerConfig,
    workload: Arc<dyn LocalUpdate>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<WorkerOutcome, WorkerError> {
    let channel = connect(&config).await?;
    let mut session = join(&config, channel, workload.as_ref()).await?;
    let mut outcome = WorkerOutcome::default();

    let (stop_heartbeat, heartbeat_stopped) = watch::channel(false);
    let heartbeat = tokio::spawn(heartbeat_loop(
        session.client.clone(),
        session.worker_id,
        session.session.clone(),
        session.heartbeat,
        heartbeat_stopped,
    ));

    let mut model = download::LocalModel::new(session.layout.total_elems());
    let mut residuals: HashMap<ClientId, Vec<f32>> = HashMap::new();
    let mut failures = 0u32;
    let result = loop {
        if *shutdown.borrow() {
            break Ok(());
        }
        let request = pb::TaskRequest {
            worker_id: session.worker_id,
            session: session.session.clone(),
            wait_ms: TASK_WAIT.as_millis() as u64,
        };
        let response = tokio::select! {
            response = session.client.get_task(request) => response,
            _ = shutdown.changed() => continue,
        };
        let task = match response {
            Ok(response) => {
                failures = 0;
                response.into_inner().outcome
            }
            Err(status) if status.code() == Code::Unauthenticated => {
                warn!(worker_id = session.worker_id, %status, "session rejected; joining again");
                let channel = connect(&config).await?;
                session = join(&config, channel, workload.as_ref()).await?;
                continue;
            }
            Err(status) => {
                failures += 1;
                if failures > config.retry.attempts {
                    warn!(%status, failures, "giving up on the coordinator");
                    break Err(WorkerError::Call {
                        call: "GetTask",
                        status,
                    });
                }
                debug!(%status, failures, "GetTask failed; retrying");
                tokio::time::sleep(config.retry.delay(failures)).await;
                continue;
            }
        };

        match task {
            Some(pb::task_response::Outcome::Finished(finished))
                if finished.reason == "shutdown" =>
            {
                // The coordinator stops to be resumed later: keep polling (bounded by the
                // retry policy once it is gone) and join it again when it is back.
                failures += 1;
                if failures > config.retry.attempts {
                    outcome.finish_reason = finished.reason;
                    break Ok(());
                }
                info!("coordinator is shutting down; waiting for it to resume");
                tokio::time::sleep(config.retry.delay(failures)).await;
            }
            Some(pb::task_response::Outcome::Finished(finished)) => {
                info!(reason = %finished.reason, "run finished");
                outcome.finish_reason = finished.reason;
                break Ok(());
            }
            Some(pb::task_response::Outcome::Wait(_)) | None => continue,
            Some(pb::task_response::Outcome::Task(task)) => {
                let result = run_task(
                    &mut session,
                    &task,
                    &mut model,
                    &mut residuals,
                    workload.clone(),
                    &mut outcome,
                )
                .await;
                if let Err(error) = result {
                    warn!(round = task.round, %error, "round task failed");
                }
            }
        }
    };

    let _ = stop_heartbeat.send(true);
    let _ = heartbeat.await;
    let leave = pb::LeaveRequest {
        worker_id: session.worker_id,
        session: session.session.clone(),
        reason: if outcome.finish_reason.is_empty() {
            "worker stopped".into()
        } else {
            "run finished".into()
        },
    };
    if let Err(status) = session.client.leave(leave).await {
        debug!(%status, "leave failed; the coordinator may be gone");
    }
    result.map(|()| outcome)
}

async fn connect(config: &WorkerConfig) -> Result<Channel, WorkerError> {
    let address_error = |reason: String| WorkerError::Address {
        address: config.coordinator.clone(),
        reason,
    };
    let mut endpoint = Endpoint::from_shared(config.coordinator.clone())
        .map_err(|e| address_error(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(HTTP2_WINDOW_BYTES)
        .initial_connection_window_size(HTTP2_WINDOW_BYTES);
    if let Some(tls) = &config.tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| address_error(e.to_string()))?;
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(source) if attempt >= config.retry.attempts => {
                warn!(address = %config.coordinator, attempt, error = %source, "failed to connect");
                return Err(WorkerError::Connect {
                    address: config.coordinator.clone(),
                    attempts: attempt,
                    source,
                });
            }
            Err(error) => {
                debug!(address = %config.coordinator, attempt, %error, "connect failed; retrying");
                tokio::time::sleep(config.retry.delay(attempt)).await;
            }
        }
    }
}

async fn join(
    config: &WorkerConfig,
    channel: Channel,
    workload: &dyn LocalUpdate,
) -> Result<Session, WorkerError> {
    // Generous limits: chunks are bounded by the coordinator's chunk size setting.
    let mut client = CoordinatorClient::new(channel)
        .max_decoding_message_size(128 << 20)
        .max_encoding_message_size(128 << 20);
    let clients = workload
        .clients()
        .into_iter()
        .map(|(client_id, num_samples)| pb::ClientInfo {
            client_id,
            num_samples,
        })
        .collect();
    let request = pb::JoinRequest {
        token: config.token.clone(),
        worker_name: config.name.clone(),
        clients,
    };
    let response = client
        .join(request)
        .await
        .map_err(|status| WorkerError::JoinRejected {
            code: status.code(),
            message: status.message().to_string(),
        })?
        .into_inner();

    let spec = response
        .model
        .ok_or_else(|| WorkerError::Model("the join response has no model".into()))?;
    let tensors: Vec<TensorSpec> = spec.tensors.iter().map(Into::into).collect();
    workload
        .check_model(&spec.kind, &tensors)
        .map_err(|e| WorkerError::Model(e.to_string()))?;
    let layout = ShardLayout::new(tensors, spec.max_shard_elems as usize)
        .map_err(|e| WorkerError::Model(e.to_string()))?;
    info!(
        worker_id = response.worker_id,
        model = %spec.kind,
        params = layout.total_elems(),
        shards = layout.num_shards(),
        "joined the coordinator"
    );
    Ok(Session {
        client,
        worker_id: response.worker_id,
        session: response.session,
        layout,
        heartbeat: Duration::from_millis(response.heartbeat_interval_ms.max(100)),
        chunk_bytes: (response.chunk_bytes as usize).clamp(1024, 64 << 20),
    })
}

async fn heartbeat_loop(
    mut client: CoordinatorClient<Channel>,
    worker_id: u64,
    session: String,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        let request = pb::HeartbeatRequest {
            worker_id,
            session: session.clone(),
        };
        if let Err(status) = client.heartbeat(request).await {
            debug!(worker_id, %status, "heartbeat failed");
        }
    }
}

async fn run_task(
    session: &mut Session,
    task: &pb::RoundTask,
    model: &mut download::LocalModel,
    residuals: &mut HashMap<ClientId, Vec<f32>>,
    workload: Arc<dyn LocalUpdate>,
    outcome: &mut WorkerOutcome,
) -> Result<(), WorkerError> {
    let round = task.round;
    if model.version != Some(task.model_version) {
        let bytes = model
            .download(
                &mut session.client,
                session.worker_id,
                &session.session,
                task.model_version,
                &session.layout,
            )
            .await?;
        outcome.bytes_down += bytes;
        debug!(
            round,
            version = task.model_version,
            bytes,
            "model downloaded"
        );
    }
    let local = task.local.clone().unwrap_or_default();
    let settings = LocalSettings {
        round,
        epochs: local.epochs,
        lr: local.lr,
        batch_size: local.batch_size,
        optimizer: local.optimizer,
        momentum: local.momentum,
        local_tol: local.local_tol,
        seed: local.seed,
    };
    let compression = task.compression.clone().unwrap_or_default();
    let quantization: Quantization = compression.quantization.parse().unwrap_or_default();
    let top_k = if compression.top_k > 0.0 {
        compression.top_k
    } else {
        1.0
    };

    for client_task in &task.clients {
        let client = client_task.client_id;
        let params = Arc::new(model.params.clone());
        let mask = Arc::new(model.mask.clone());
        let trained = {
            let workload = workload.clone();
            let params = params.clone();
            let mask = mask.clone();
            let settings = settings.clone();
            tokio::task::spawn_blocking(move || workload.train(client, &params, &mask, &settings))
                .await
                .expect("local training does not panic")
        };
        let trained = match trained {
            Ok(trained) if trained.len() == params.len() => trained,
            Ok(trained) => {
                warn!(
                    round,
                    client_id = client,
                    got = trained.len(),
                    "local update returned a wrong length; skipping the client"
                );
                let reason = "local update returned a wrong length";
                report_failure(session, round, client, reason).await;
                continue;
            }
            Err(error) => {
                warn!(round, client_id = client, %error, "local update failed; skipping the client");
                report_failure(session, round, client, &error.to_string()).await;
                continue;
            }
        };
        let samples = workload
            .clients()
            .iter()
            .find(|(c, _)| *c == client)
            .map_or(0, |(_, n)| *n);
        let residual = (top_k < 1.0 || quantization != Quantization::None).then(|| {
            residuals
                .entry(client)
                .or_insert_with(|| vec![0.0; params.len()])
        });
        let upload = upload::UploadPlan {
            worker_id: session.worker_id,
            session: &session.session,
            round,
            model_version: task.model_version,
            client,
            samples,
            shards: &client_task.shard_ids,
            layout: &session.layout,
            mask: &mask,
            top_k,
            quantization,
            chunk_bytes: session.chunk_bytes,
        };
        let messages = upload.build(&params, &trained, residual.map(|r| r.as_mut_slice()));
        match upload::send(&mut session.client, messages).await {
            Ok(bytes) => {
                outcome.updates_sent += 1;
                outcome.bytes_up += bytes;
                debug!(round, client_id = client, bytes, "update uploaded");
            }
            Err(status) => {
                outcome.updates_rejected += 1;
                report_failure(session, round, client, status.message()).await;
                warn!(round, client_id = client, code = ?status.code(), message = status.message(), "update rejected");
            }
        }
    }
    outcome.rounds += 1;
    Ok(())
}

/// Tells the coordinator that `client` delivers nothing this round, so the round does not wait
/// for it until the deadline. A failed report is only logged: the deadline still applies.
async fn report_failure(session: &mut Session, round: u64, client: ClientId, reason: &str) {
    let report = pb::FailureReport {
        worker_id: session.worker_id,
        session: session.session.clone(),
        round,
        client_id: client,
        reason: reason.to_string(),
    };
    if let Err(status) = session.client.report_failure(report).await {
        warn!(round, client_id = client, %status, "failed to report the failed client");
    }
}
