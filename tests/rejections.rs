//! End to end: every kind of bad upload is rejected with its gRPC status, and the global
//! model ends up exactly as if only the valid uploads had been sent.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Process, read_log, wait_for_port};
use fedcompress_core::{ShardLayout, TensorSpec, checksum, codec};
use fedcompress_proto::pb;
use pb::coordinator_client::CoordinatorClient;
use tokio::time::timeout;
use tonic::Code;
use tonic::transport::Channel;

const MODEL: &str = "synthetic:w=40x50,b=50,s=scalar";
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

struct Worker {
    client: CoordinatorClient<Channel>,
    id: u64,
    session: String,
}

async fn join(address: &str, name: &str, client_id: u32, samples: u64) -> Worker {
    let mut client = timeout(
        CALL_TIMEOUT,
        CoordinatorClient::connect(address.to_string()),
    )
    .await
    .unwrap()
    .unwrap();
    let response = timeout(
        CALL_TIMEOUT,
        client.join(pb::JoinRequest {
            token: String::new(),
            worker_name: name.into(),
            clients: vec![pb::ClientInfo {
                client_id,
                num_samples: samples,
            }],
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    Worker {
        client,
        id: response.worker_id,
        session: response.session,
    }
}

async fn task(worker: &mut Worker) -> pb::RoundTask {
    for _ in 0..10 {
        let response = timeout(
            CALL_TIMEOUT,
            worker.client.get_task(pb::TaskRequest {
                worker_id: worker.id,
                session: worker.session.clone(),
                wait_ms: 5000,
            }),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner();
        if let Some(pb::task_response::Outcome::Task(task)) = response.outcome {
            return task;
        }
    }
    panic!("no task within 10 polls");
}

async fn download(worker: &mut Worker, version: u64, len: usize) -> Vec<f32> {
    let mut stream = timeout(
        CALL_TIMEOUT,
        worker.client.download(pb::DownloadRequest {
            worker_id: worker.id,
            session: worker.session.clone(),
            model_version: version,
            mask_version: 0,
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = timeout(CALL_TIMEOUT, stream.message())
        .await
        .unwrap()
        .unwrap()
    {
        bytes.extend_from_slice(&chunk.payload);
    }
    let values = codec::f32s_from_bytes(&bytes).unwrap();
    assert_eq!(values.len(), len);
    values
}

/// Builds an upload message list: a header, then one dense segment per (shard, values).
fn upload(
    worker: &Worker,
    round: u64,
    client_id: u32,
    samples: u64,
    shards: &[(u32, Vec<f32>)],
) -> Vec<pb::UpdateChunk> {
    let mut messages = vec![pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader {
            worker_id: worker.id,
            session: worker.session.clone(),
            round,
            client_id,
            num_samples: samples,
            model_version: 0,
        })),
    }];
    for (shard_id, values) in shards {
        let mut bytes = Vec::new();
        codec::put_f32s(&mut bytes, values.iter().copied());
        messages.push(pb::UpdateChunk {
            part: Some(pb::update_chunk::Part::Segment(pb::ShardSegment {
                shard_id: *shard_id,
                offset: 0,
                shard_bytes: bytes.len() as u64,
                shard_checksum: checksum(&bytes),
                payload: Bytes::from(bytes),
                encoding: pb::UpdateEncoding::Dense as i32,
            })),
        });
    }
    messages
}

async fn send(worker: &mut Worker, messages: Vec<pb::UpdateChunk>) -> Result<(), tonic::Status> {
    timeout(
        CALL_TIMEOUT,
        worker.client.upload(tokio_stream::iter(messages)),
    )
    .await
    .unwrap()
    .map(|_| ())
}

fn segment_mut(messages: &mut [pb::UpdateChunk], index: usize) -> &mut pb::ShardSegment {
    match messages[index].part.as_mut() {
        Some(pb::update_chunk::Part::Segment(segment)) => segment,
        _ => panic!("message {index} is not a segment"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_rejected_and_model_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let port_file = dir.path().join("port");
    let checkpoints = dir.path().join("checkpoints");
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
            "2",
            "--workers",
            "2",
            "--rounds",
            "1",
            "--assignment",
            "partition",
            "--max-shard-elems",
            "500",
            "--checkpoint-dir",
            checkpoints.to_str().unwrap(),
            "--out",
            dir.path().join("out").to_str().unwrap(),
        ],
        dir.path(),
    );
    let port = wait_for_port(&port_file, Duration::from_secs(30));
    let address = format!("http://127.0.0.1:{port}");

    let tensors = vec![
        TensorSpec::new("w", [40, 50]),
        TensorSpec::new("b", [50]),
        TensorSpec::new("s", []),
    ];
    let layout = ShardLayout::new(tensors, 500).unwrap();
    let shard_len = |id: u32| layout.shard(id).unwrap().len();

    let mut a = join(&address, "worker-a", 0, 30).await;
    let mut b = join(&address, "worker-b", 1, 10).await;
    let task_a = task(&mut a).await;
    let task_b = task(&mut b).await;
    let shards_a = task_a.clients[0].shard_ids.clone();
    let shards_b = task_b.clients[0].shard_ids.clone();
    assert!(!shards_a.is_empty());
    assert!(!shards_b.is_empty());
    let before = download(&mut a, 0, layout.total_elems()).await;

    let good_a: Vec<(u32, Vec<f32>)> = shards_a
        .iter()
        .map(|&id| (id, (0..shard_len(id)).map(|i| i as f32 * 0.01).collect()))
        .collect();
    let good_b: Vec<(u32, Vec<f32>)> = shards_b
        .iter()
        .map(|&id| (id, vec![-0.5; shard_len(id)]))
        .collect();

    let mut cases: Vec<(&str, Vec<pb::UpdateChunk>, Code)> = Vec::new();
    cases.push((
        "wrong round",
        upload(&a, 2, 0, 30, &good_a),
        Code::FailedPrecondition,
    ));
    let mut foreign_shard = good_a.clone();
    foreign_shard.push((shards_b[0], vec![0.0; shard_len(shards_b[0])]));
    cases.push((
        "unassigned shard",
        upload(&a, 1, 0, 30, &foreign_shard),
        Code::InvalidArgument,
    ));
    let mut short = good_a.clone();
    short[0].1.pop();
    cases.push((
        "wrong length",
        upload(&a, 1, 0, 30, &short),
        Code::InvalidArgument,
    ));
    let mut bad_checksum = upload(&a, 1, 0, 30, &good_a);
    segment_mut(&mut bad_checksum, 1).shard_checksum ^= 1;
    cases.push(("bad checksum", bad_checksum, Code::InvalidArgument));
    let mut nan = good_a.clone();
    nan[0].1[3] = f32::NAN;
    cases.push((
        "non-finite value",
        upload(&a, 1, 0, 30, &nan),
        Code::InvalidArgument,
    ));
    let mut infinite = good_a.clone();
    infinite[0].1[0] = f32::INFINITY;
    cases.push((
        "infinite value",
        upload(&a, 1, 0, 30, &infinite),
        Code::InvalidArgument,
    ));
    cases.push((
        "foreign client",
        upload(&a, 1, 1, 10, &good_b),
        Code::PermissionDenied,
    ));
    cases.push((
        "missing shard",
        upload(&a, 1, 0, 30, &good_a[1..]),
        Code::InvalidArgument,
    ));
    cases.push((
        "wrong sample count",
        upload(&a, 1, 0, 31, &good_a),
        Code::InvalidArgument,
    ));
    let mut bad_session = upload(&a, 1, 0, 30, &good_a);
    if let Some(pb::update_chunk::Part::Header(header)) = bad_session[0].part.as_mut() {
        header.session = "forged".into();
    }
    cases.push(("forged session", bad_session, Code::Unauthenticated));

    for (name, messages, code) in cases {
        let status = send(&mut a, messages).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {}", status.message());
        assert!(!status.message().is_empty(), "{name} has no message");
    }

    let valid_a = upload(&a, 1, 0, 30, &good_a);
    send(&mut a, valid_a.clone()).await.expect("valid upload");
    let status = send(&mut a, valid_a).await.expect_err("duplicate");
    assert_eq!(status.code(), Code::AlreadyExists, "{}", status.message());

    let during = download(&mut a, 0, layout.total_elems()).await;
    assert!(
        before
            .iter()
            .zip(&during)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "the model changed before the round closed"
    );

    let valid_b = upload(&b, 1, 1, 10, &good_b);
    send(&mut b, valid_b).await.expect("valid upload of b");
    let status = coordinator.wait(Duration::from_secs(60));
    assert!(
        status.success(),
        "coordinator failed:\n{}",
        read_log(dir.path(), "coordinator")
    );

    // Only the two valid updates reach the model; with `partition`, each shard has one.
    let checkpoint =
        fedcompress_coordinator::Checkpoint::load(&checkpoints.join("round-000001.ckpt")).unwrap();
    let mut expected = before.clone();
    for (id, values) in good_a.iter().chain(&good_b) {
        let range = layout.shard(*id).unwrap().range.clone();
        for (slot, delta) in expected[range].iter_mut().zip(values) {
            *slot = (*slot as f64 + *delta as f64) as f32;
        }
    }
    assert!(
        expected
            .iter()
            .zip(&checkpoint.params)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "the aggregate holds something other than the valid updates"
    );
    let log = read_log(dir.path(), "coordinator");
    for reason in [
        "wrong_round",
        "shard_not_assigned",
        "wrong_length",
        "bad_checksum",
        "non_finite",
        "duplicate",
    ] {
        assert!(log.contains(reason), "no log line with reason {reason}");
    }
}

async fn leave(worker: &mut Worker) {
    let request = pb::LeaveRequest {
        worker_id: worker.id,
        session: worker.session.clone(),
        reason: "test done".into(),
    };
    let _ = timeout(CALL_TIMEOUT, worker.client.leave(request)).await;
}

/// Runs two rounds in which both clients send the largest finite f32 for every parameter,
/// under the given extra coordinator flags; returns the final parameters.
async fn run_hostile_rounds(extra: &[&str]) -> Vec<f32> {
    let dir = tempfile::tempdir().unwrap();
    let port_file = dir.path().join("port");
    let checkpoints = dir.path().join("checkpoints");
    let out = dir.path().join("out");
    let mut args = vec![
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--port-file",
        port_file.to_str().unwrap(),
        "--model",
        MODEL,
        "--clients",
        "2",
        "--workers",
        "2",
        "--rounds",
        "2",
        "--max-shard-elems",
        "500",
        "--checkpoint-dir",
        checkpoints.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut coordinator = Process::spawn("coordinator", &args, dir.path());
    let port = wait_for_port(&port_file, Duration::from_secs(30));
    let address = format!("http://127.0.0.1:{port}");
    let layout = ShardLayout::new(
        vec![
            TensorSpec::new("w", [40, 50]),
            TensorSpec::new("b", [50]),
            TensorSpec::new("s", []),
        ],
        500,
    )
    .unwrap();

    let mut workers = vec![
        join(&address, "worker-a", 0, 5).await,
        join(&address, "worker-b", 1, 7).await,
    ];
    for round in 1..=2u64 {
        for (client, worker) in workers.iter_mut().enumerate() {
            let task = task(worker).await;
            assert_eq!(task.round, round);
            let shards: Vec<(u32, Vec<f32>)> = task.clients[0]
                .shard_ids
                .iter()
                .map(|&id| (id, vec![f32::MAX; layout.shard(id).unwrap().len()]))
                .collect();
            let mut messages = upload(worker, round, client as u32, [5, 7][client], &shards);
            if let Some(pb::update_chunk::Part::Header(header)) = messages[0].part.as_mut() {
                header.model_version = task.model_version;
            }
            send(worker, messages)
                .await
                .expect("finite hostile update is accepted");
        }
    }
    for worker in &mut workers {
        leave(worker).await;
    }
    let status = coordinator.wait(Duration::from_secs(60));
    assert!(
        status.success(),
        "coordinator failed:\n{}",
        read_log(dir.path(), "coordinator")
    );
    let log = read_log(dir.path(), "coordinator");
    assert!(
        log.contains("shard left unchanged"),
        "overflow not logged:\n{log}"
    );
    fedcompress_coordinator::Checkpoint::load_latest(&checkpoints)
        .unwrap()
        .params
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_updates_keep_model_finite() {
    let variants: [&[&str]; 4] = [
        &[],
        &["--aggregation", "median"],
        &["--aggregation", "trimmed:0.2"],
        &["--server-momentum", "0.9"],
    ];
    for extra in variants {
        let params = run_hostile_rounds(extra).await;
        assert!(
            params.iter().all(|v| v.is_finite()),
            "{extra:?}: the model holds a non-finite value"
        );
        assert!(
            params.iter().any(|v| *v != 0.0),
            "{extra:?}: the first round should have applied"
        );
    }
}
