//! Measures the throughput of Download and Upload over loopback.
//!
//! Starts a coordinator on 127.0.0.1 with a synthetic model of one ROWS×COLS f32 tensor, then
//! acts as its only worker through the raw gRPC client. Each round it downloads the whole model
//! and uploads a dense update of every shard, built as the worker builds it, and times both
//! streams. Client and coordinator share one tokio runtime, so they share the machine's cores.
//!
//! Usage: cargo run [--release] -p fedcompress-coordinator --example transfer_bench -- [OPTIONS]

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use fedcompress_coordinator::{CoordinatorConfig, ModelSetup, RunHooks, RunOutcome};
use fedcompress_core::{Mask, Quantization, ShardLayout, TensorSpec, codec};
use fedcompress_proto::convert::wire_len;
use fedcompress_proto::pb;
use fedcompress_proto::pb::coordinator_client::CoordinatorClient;
use fedcompress_worker::upload::UploadPlan;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

/// Maximum time the whole benchmark may take before it counts as hung.
const BENCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// Value added to every parameter by the uploaded update: small and finite, so every round
/// passes the coordinator's checks and the model stays finite.
const DELTA: f32 = 1e-3;

/// Times Download and Upload of a synthetic model over loopback gRPC.
#[derive(Parser, Debug)]
struct Args {
    /// Rounds to run. Each round downloads and uploads the whole model once.
    #[arg(long, default_value_t = 5)]
    rounds: u64,
    /// Rows of the model's one tensor `w0`.
    #[arg(long, default_value_t = 8192)]
    rows: usize,
    /// Columns of the model's one tensor `w0`.
    #[arg(long, default_value_t = 8192)]
    cols: usize,
    /// Maximum elements per shard.
    #[arg(long, default_value_t = CoordinatorConfig::default().max_shard_elems)]
    shard_elems: usize,
    /// Maximum payload of a stream chunk, in bytes.
    #[arg(long, default_value_t = CoordinatorConfig::default().chunk_bytes)]
    chunk_bytes: usize,
}

/// Timings and byte counts of one round.
struct RoundMeasure {
    round: u64,
    download_secs: f64,
    download_payload: u64,
    download_wire: u64,
    build_secs: f64,
    upload_secs: f64,
    upload_payload: u64,
    upload_wire: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let params = args.rows * args.cols;
    ensure!(
        params > 0,
        "invalid model: --rows and --cols must be positive"
    );

    let config = CoordinatorConfig {
        clients: 1,
        rounds: args.rounds,
        max_shard_elems: args.shard_elems,
        chunk_bytes: args.chunk_bytes,
        // The benchmark sends no heartbeats, so a long timeout keeps its worker in the round
        // even when an unoptimized build streams the model slowly.
        heartbeat_timeout_secs: 3600.0,
        ..CoordinatorConfig::default()
    };
    let model = ModelSetup {
        kind: "synthetic".into(),
        tensors: vec![TensorSpec::new("w0", [args.rows, args.cols])],
        initial: (0..params).map(|i| (i % 1000) as f32 * 1e-3).collect(),
    };

    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("failed to bind 127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let (stop, shutdown) = watch::channel(false);
    let coordinator = tokio::spawn(fedcompress_coordinator::run(
        listener,
        config,
        model,
        RunHooks::default(),
        shutdown,
    ));

    let measures = tokio::time::timeout(BENCH_TIMEOUT, act_as_worker(address))
        .await
        .context("the benchmark timed out")?;
    let measures = match measures {
        Ok(measures) => measures,
        Err(error) => {
            let _ = stop.send(true);
            return Err(error);
        }
    };
    let outcome = tokio::time::timeout(Duration::from_secs(60), coordinator)
        .await
        .context("the coordinator did not stop after the last round")?
        .context("the coordinator task failed")??;

    report(&args, &measures, &outcome);
    Ok(())
}

/// Joins the coordinator and runs every round, returning one measure per round.
async fn act_as_worker(address: std::net::SocketAddr) -> anyhow::Result<Vec<RoundMeasure>> {
    // Same endpoint settings as the worker's connect.
    let channel = Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(fedcompress_coordinator::HTTP2_WINDOW_BYTES)
        .initial_connection_window_size(fedcompress_coordinator::HTTP2_WINDOW_BYTES)
        .connect()
        .await
        .context("failed to connect to the coordinator")?;
    let mut client = CoordinatorClient::new(channel);

    let mut join = client
        .join(pb::JoinRequest {
            token: String::new(),
            worker_name: "transfer-bench".into(),
            clients: vec![pb::ClientInfo {
                client_id: 0,
                num_samples: 1,
            }],
        })
        .await
        .context("join failed")?
        .into_inner();
    let spec = join
        .model
        .take()
        .context("the join response has no model")?;
    let tensors: Vec<TensorSpec> = spec.tensors.iter().map(Into::into).collect();
    let layout = ShardLayout::new(tensors, spec.max_shard_elems as usize)?;
    let mask = Mask::all_kept(layout.total_elems());
    println!(
        "model: {} f32 parameters ({} bytes), {} shards of at most {} elements, chunks of at most {} bytes",
        layout.total_elems(),
        layout.total_elems() * 4,
        layout.num_shards(),
        layout.max_shard_elems(),
        join.chunk_bytes,
    );

    let mut measures = Vec::new();
    loop {
        let response = client
            .get_task(pb::TaskRequest {
                worker_id: join.worker_id,
                session: join.session.clone(),
                wait_ms: 10_000,
            })
            .await
            .context("GetTask failed")?
            .into_inner();
        let task = match response.outcome {
            Some(pb::task_response::Outcome::Task(task)) => task,
            Some(pb::task_response::Outcome::Finished(_)) => break,
            Some(pb::task_response::Outcome::Wait(_)) | None => continue,
        };
        let shards = match task.clients.as_slice() {
            [only] => only.shard_ids.clone(),
            other => bail!("expected a task for one client, got {}", other.len()),
        };

        let started = Instant::now();
        let download = download(&mut client, &join, task.model_version).await?;
        let download_secs = started.elapsed().as_secs_f64();

        // Decode after the clock stops: the timed part is the stream alone.
        let global = decode_model(&layout, &download.shards)?;
        let started = Instant::now();
        let trained: Vec<f32> = global.iter().map(|value| value + DELTA).collect();
        let plan = UploadPlan {
            worker_id: join.worker_id,
            session: &join.session,
            round: task.round,
            model_version: task.model_version,
            client: 0,
            samples: 1,
            shards: &shards,
            layout: &layout,
            mask: &mask,
            top_k: 1.0,
            quantization: Quantization::None,
            chunk_bytes: join.chunk_bytes as usize,
        };
        let messages = plan.build(&global, &trained, None);
        let build_secs = started.elapsed().as_secs_f64();
        let upload_wire: u64 = messages.iter().map(wire_len).sum();
        let upload_payload: u64 = messages
            .iter()
            .filter_map(|message| match &message.part {
                Some(pb::update_chunk::Part::Segment(segment)) => {
                    Some(segment.payload.len() as u64)
                }
                _ => None,
            })
            .sum();
        drop(global);
        drop(trained);

        let started = Instant::now();
        let accepted = client
            .upload(tokio_stream::iter(messages))
            .await
            .context("upload failed")?
            .into_inner();
        let upload_secs = started.elapsed().as_secs_f64();
        ensure!(
            accepted.shards_accepted as usize == shards.len(),
            "the coordinator accepted {} of {} shards",
            accepted.shards_accepted,
            shards.len()
        );
        ensure!(
            accepted.bytes_received == upload_wire,
            "the coordinator counted {} upload bytes, the client sent {upload_wire}",
            accepted.bytes_received
        );

        let measure = RoundMeasure {
            round: task.round,
            download_secs,
            download_payload: download.payload,
            download_wire: download.wire,
            build_secs,
            upload_secs,
            upload_payload,
            upload_wire,
        };
        println!(
            "round {}: download {:.3} s ({:.2} GB/s), build {:.3} s, upload {:.3} s ({:.2} GB/s)",
            measure.round,
            measure.download_secs,
            gb_per_sec(measure.download_payload, measure.download_secs),
            measure.build_secs,
            measure.upload_secs,
            gb_per_sec(measure.upload_payload, measure.upload_secs),
        );
        measures.push(measure);
    }

    client
        .leave(pb::LeaveRequest {
            worker_id: join.worker_id,
            session: join.session.clone(),
            reason: "benchmark done".into(),
        })
        .await
        .context("leave failed")?;
    Ok(measures)
}

/// The payloads of one model download, per shard, with its byte counts.
struct Download {
    shards: Vec<Vec<Bytes>>,
    payload: u64,
    wire: u64,
}

/// Receives every chunk of model `version` and keeps the payloads without decoding them.
async fn download(
    client: &mut CoordinatorClient<Channel>,
    join: &pb::JoinResponse,
    version: u64,
) -> anyhow::Result<Download> {
    let request = pb::DownloadRequest {
        worker_id: join.worker_id,
        session: join.session.clone(),
        model_version: version,
        mask_version: 0,
    };
    let mut stream = client
        .download(request)
        .await
        .context("download failed")?
        .into_inner();

    let mut result = Download {
        shards: Vec::new(),
        payload: 0,
        wire: 0,
    };
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("download stream failed")?;
        result.wire += wire_len(&chunk);
        result.payload += chunk.payload.len() as u64;
        let shard = chunk.shard_id as usize;
        if result.shards.len() <= shard {
            result.shards.resize_with(shard + 1, Vec::new);
        }
        result.shards[shard].push(chunk.payload);
    }
    Ok(result)
}

/// Rebuilds the flat parameter vector from dense shard payloads.
fn decode_model(layout: &ShardLayout, shards: &[Vec<Bytes>]) -> anyhow::Result<Vec<f32>> {
    ensure!(
        shards.len() == layout.num_shards(),
        "the download held {} shards, the layout has {}",
        shards.len(),
        layout.num_shards()
    );
    let mut params = Vec::with_capacity(layout.total_elems());
    for (shard, payloads) in layout.shards().iter().zip(shards) {
        let bytes: Vec<u8> = payloads.concat();
        let values = codec::f32s_from_bytes(&bytes).context("a shard is not whole f32s")?;
        ensure!(
            values.len() == shard.len(),
            "shard {} has {} values, expected {} (the benchmark expects dense shards)",
            shard.id,
            values.len(),
            shard.len()
        );
        params.extend_from_slice(&values);
    }
    Ok(params)
}

fn gb_per_sec(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn report(args: &Args, measures: &[RoundMeasure], outcome: &RunOutcome) {
    if measures.is_empty() {
        println!("no round ran");
        return;
    }
    let first = &measures[0];
    let download = median(
        measures
            .iter()
            .map(|m| gb_per_sec(m.download_payload, m.download_secs))
            .collect(),
    );
    let upload = median(
        measures
            .iter()
            .map(|m| gb_per_sec(m.upload_payload, m.upload_secs))
            .collect(),
    );
    let build = median(measures.iter().map(|m| m.build_secs).collect());
    println!(
        "rounds: {} of {}, stop reason: {}",
        measures.len(),
        args.rounds,
        outcome.reason
    );
    println!(
        "round 1: download payload {} bytes, message bytes {}; upload payload {} bytes, message bytes {}",
        first.download_payload, first.download_wire, first.upload_payload, first.upload_wire
    );
    println!(
        "message bytes over the run: down {} bytes, up {} bytes (benchmark client); down {} bytes, up {} bytes (coordinator counters)",
        measures.iter().map(|m| m.download_wire).sum::<u64>(),
        measures.iter().map(|m| m.upload_wire).sum::<u64>(),
        outcome.traffic.bytes_down,
        outcome.traffic.bytes_up
    );
    println!("median download: {download:.2} GB/s of payload");
    println!("median upload: {upload:.2} GB/s of payload, until the coordinator accepted it");
    println!("median build of the upload messages: {build:.3} s");
}
