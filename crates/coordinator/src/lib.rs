//! The fedcompress coordinator: the gRPC service, the worker registry, the round engine and
//! checkpoints.

pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod error;
pub mod evaluate;
pub mod prune;
pub mod registry;
mod service;
mod state;

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use fedcompress_core::{LayoutError, Mask, ShardLayout, TensorSpec, TrafficCounters};
use fedcompress_proto::pb::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

pub use checkpoint::{Checkpoint, CheckpointError};
pub use config::{CompressionConfig, ConfigError, CoordinatorConfig, LocalConfig};
pub use engine::{Evaluation, Evaluator, Pruner, RoundSummary, RunError, RunOutcome, StopReason};

use crate::engine::{Engine, EngineState};
use crate::service::CoordinatorService;
use crate::state::{ModelSnapshot, Shared};

/// Maximum time the coordinator waits, after the last round, for workers to learn that the
/// run has ended and leave.
const LEAVE_GRACE: Duration = Duration::from_secs(10);

/// HTTP/2 flow-control window per stream and per connection, in bytes. hyper's default of
/// 1 MiB fits a single chunk, so an upload stalls on window updates. 16 MiB let a 256 MB
/// upload on loopback go from about 0.18 to 0.30 GB/s (docs/benchmarks.md).
pub const HTTP2_WINDOW_BYTES: u32 = 16 << 20;

/// The model the coordinator trains: its kind, named tensors and initial parameters.
#[derive(Clone, Debug)]
pub struct ModelSetup {
    /// "mlp", "cnn" or "synthetic"; workers build their trainer from it.
    pub kind: String,
    pub tensors: Vec<TensorSpec>,
    pub initial: Vec<f32>,
}

/// Optional parts of a run.
#[derive(Default)]
pub struct RunHooks {
    pub evaluator: Option<Arc<dyn Evaluator>>,
    pub pruner: Option<Arc<dyn Pruner>>,
    /// Receives the summary of every completed round.
    pub events: Option<mpsc::UnboundedSender<RoundSummary>>,
    /// Continue from this checkpoint instead of the initial parameters.
    pub resume: Option<Checkpoint>,
    /// TLS identity of the server; plain TCP when `None`.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid model: {0}")]
    Layout(#[from] LayoutError),
    #[error("invalid model: the initial parameters have {got} values, the tensors need {expected}")]
    ParamCount { got: usize, expected: usize },
    #[error("checkpoint does not match this run: {0}; resume with the same model and settings")]
    CheckpointMismatch(String),
    #[error("invalid TLS settings: {0}")]
    Tls(String),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Run(#[from] RunError),
}

/// Runs the coordinator on `listener` until the run ends or `shutdown` turns true.
pub async fn run(
    listener: TcpListener,
    config: CoordinatorConfig,
    model: ModelSetup,
    hooks: RunHooks,
    mut shutdown: watch::Receiver<bool>,
) -> Result<RunOutcome, CoordinatorError> {
    config.validate()?;
    let layout = ShardLayout::new(model.tensors.clone(), config.max_shard_elems)?;
    if model.initial.len() != layout.total_elems() {
        return Err(CoordinatorError::ParamCount {
            got: model.initial.len(),
            expected: layout.total_elems(),
        });
    }

    let mut traffic = TrafficCounters::default();
    let mut state = EngineState {
        next_round: 1,
        server_state: Default::default(),
        converged_streak: 0,
        history: Vec::new(),
    };
    let mut snapshot = ModelSnapshot::new(
        &layout,
        0,
        model.initial.clone(),
        Mask::all_kept(layout.total_elems()),
        0,
    );
    if let Some(checkpoint) = hooks.resume {
        let header = &checkpoint.header;
        if header.tensors != model.tensors || header.model_kind != model.kind {
            return Err(CoordinatorError::CheckpointMismatch(format!(
                "it contains a `{}` model with {} tensors",
                header.model_kind,
                header.tensors.len()
            )));
        }
        traffic = TrafficCounters::with_totals(header.traffic);
        state.next_round = header.round + 1;
        state.converged_streak = header.converged_streak;
        state.history = header
            .history
            .iter()
            .filter_map(|value| serde_json::from_value(value.clone()).ok())
            .collect();
        state.server_state = checkpoint.server_state;
        snapshot = ModelSnapshot::new(
            &layout,
            header.model_version,
            checkpoint.params,
            checkpoint.mask,
            header.mask_version,
        );
        info!(round = header.round, "resuming from checkpoint");
    }

    let run_config_json = serde_json::to_string(&config).expect("config serializes");
    let shared = Arc::new(Shared {
        config: config.clone(),
        layout,
        model_kind: model.kind,
        registry: Default::default(),
        model: RwLock::new(Arc::new(snapshot)),
        round: Mutex::new(None),
        round_changed: watch::channel(0).0,
        updates: Notify::new(),
        finished: watch::channel(None).0,
        traffic,
        run_config_json,
    });

    let address = listener.local_addr().ok();
    let message_limit = config.chunk_bytes + (1 << 20);
    let service = CoordinatorServer::new(CoordinatorService::new(shared.clone()))
        .max_decoding_message_size(message_limit)
        .max_encoding_message_size(message_limit);
    let mut builder = tonic::transport::Server::builder()
        .initial_stream_window_size(HTTP2_WINDOW_BYTES)
        .initial_connection_window_size(HTTP2_WINDOW_BYTES);
    if let Some(tls) = hooks.tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| CoordinatorError::Tls(e.to_string()))?;
    }
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(builder.add_service(service).serve_with_incoming_shutdown(
        TcpListenerStream::new(listener),
        async {
            let _ = server_stopped.await;
        },
    ));
    info!(address = ?address, "coordinator listening");

    let engine = Engine {
        shared: shared.clone(),
        evaluator: hooks.evaluator,
        pruner: hooks.pruner,
        events: hooks.events,
        state,
    };
    let outcome = engine.run(shutdown.clone()).await;

    // Give workers a moment to fetch the end of the run and leave.
    let grace_end = Instant::now() + LEAVE_GRACE;
    while !shared.registry.workers.is_empty() && Instant::now() < grace_end && !*shutdown.borrow() {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = shutdown.changed() => {}
        }
    }
    if !shared.registry.workers.is_empty() {
        warn!(
            workers = shared.registry.workers.len(),
            "stopping with workers still joined"
        );
    }
    let _ = stop_server.send(());
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => warn!(%error, "gRPC server stopped with an error"),
        Err(error) => warn!(%error, "gRPC server task failed"),
    }
    info!("coordinator stopped");
    Ok(outcome?)
}
