//! The gRPC handlers: thin adapters between the wire and the shared round state.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fedcompress_core::{Direction, ShardId, checksum, codec};
use fedcompress_proto::{convert, pb};
use futures::Stream;
use rand::RngCore;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument, warn};

use crate::error::ServiceError;
use crate::registry::WorkerId;
use crate::state::{ClientUpdate, RoundState, Shared};

/// Maximum time a GetTask long poll is held open, whatever wait the worker requests.
const MAX_TASK_WAIT: Duration = Duration::from_secs(30);

pub struct CoordinatorService {
    shared: Arc<Shared>,
}

impl CoordinatorService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn authenticate(&self, worker_id: WorkerId, session: &str) -> Result<(), ServiceError> {
        if self.shared.registry.authenticate(worker_id, session) {
            Ok(())
        } else {
            Err(ServiceError::UnknownSession(worker_id))
        }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ModelChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    #[instrument(skip_all, fields(worker = %request.get_ref().worker_name))]
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let request = request.into_inner();
        let shared = &self.shared;
        if !shared.config.token.is_empty() && request.token != shared.config.token {
            warn!(reason = "bad_token", "rejecting join");
            return Err(ServiceError::BadToken.into());
        }
        if request.worker_name.trim().is_empty() {
            return Err(ServiceError::InvalidJoin("worker_name is empty".into()).into());
        }

        let mut clients = BTreeMap::new();
        for client in &request.clients {
            if clients
                .insert(client.client_id, client.num_samples)
                .is_some()
            {
                let message = format!("client {} is listed twice", client.client_id);
                return Err(ServiceError::InvalidJoin(message).into());
            }
        }
        let session = new_session();
        let worker_id = shared
            .registry
            .join(&request.worker_name, session.clone(), clients.clone())
            .map_err(|error| {
                warn!(%error, "rejecting join");
                ServiceError::InvalidJoin(error.to_string())
            })?;

        // A worker that joins again (a restart) gets the task of the open round again.
        if let Some(round) = shared.round.lock().expect("round lock").as_mut() {
            round.dispatched.remove(&worker_id);
        }
        shared.updates.notify_one();
        info!(
            worker_id,
            clients = ?clients.keys().collect::<Vec<_>>(),
            samples = clients.values().sum::<u64>(),
            "worker joined"
        );

        Ok(Response::new(pb::JoinResponse {
            worker_id,
            session,
            model: Some(pb::ModelSpec {
                kind: shared.model_kind.clone(),
                tensors: shared.layout.tensors().iter().map(Into::into).collect(),
                max_shard_elems: shared.layout.max_shard_elems() as u64,
            }),
            chunk_bytes: shared.config.chunk_bytes as u64,
            heartbeat_interval_ms: shared.config.heartbeat_interval_ms,
            run_config_json: shared.run_config_json.clone(),
        }))
    }

    #[instrument(skip_all, fields(worker_id = request.get_ref().worker_id))]
    async fn get_task(
        &self,
        request: Request<pb::TaskRequest>,
    ) -> Result<Response<pb::TaskResponse>, Status> {
        let request = request.into_inner();
        self.authenticate(request.worker_id, &request.session)?;
        let wait = Duration::from_millis(request.wait_ms).min(MAX_TASK_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.shared.round_changed.subscribe();

        loop {
            if let Some(reason) = self.shared.finished_reason() {
                let outcome = pb::task_response::Outcome::Finished(pb::Finished { reason });
                return Ok(Response::new(pb::TaskResponse {
                    outcome: Some(outcome),
                }));
            }
            if let Some(task) = self.take_task(request.worker_id) {
                let outcome = pb::task_response::Outcome::Task(task);
                return Ok(Response::new(pb::TaskResponse {
                    outcome: Some(outcome),
                }));
            }
            changes.borrow_and_update();
            let timed_out = tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err();
            if timed_out {
                let outcome = pb::task_response::Outcome::Wait(pb::Wait { retry_after_ms: 0 });
                return Ok(Response::new(pb::TaskResponse {
                    outcome: Some(outcome),
                }));
            }
        }
    }

    type DownloadStream = ChunkStream;

    #[instrument(skip_all, fields(worker_id = request.get_ref().worker_id, version = request.get_ref().model_version))]
    async fn download(
        &self,
        request: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let request = request.into_inner();
        self.authenticate(request.worker_id, &request.session)?;
        let snapshot = self.shared.snapshot();
        if snapshot.version != request.model_version {
            return Err(ServiceError::StaleModelVersion {
                requested: request.model_version,
                current: snapshot.version,
            }
            .into());
        }

        let send_mask = request.mask_version != snapshot.mask_version;
        let chunk_bytes = self.shared.config.chunk_bytes;
        let shared = self.shared.clone();
        let (sender, receiver) = mpsc::channel(4);
        tokio::spawn(async move {
            for (id, shard) in snapshot.encoded.iter().enumerate() {
                let total = shard.payload.len();
                let mut offset = 0;
                loop {
                    let end = (offset + chunk_bytes).min(total);
                    let chunk = pb::ModelChunk {
                        model_version: snapshot.version,
                        shard_id: id as ShardId,
                        offset: offset as u64,
                        payload: shard.payload.slice(offset..end),
                        layout: shard.layout as i32,
                        shard_bytes: total as u64,
                        shard_checksum: shard.checksum,
                        mask: if send_mask && offset == 0 {
                            shard.mask.clone()
                        } else {
                            Bytes::new()
                        },
                        mask_version: snapshot.mask_version,
                    };
                    shared
                        .traffic
                        .add(Direction::Down, convert::wire_len(&chunk));
                    if sender.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                    offset = end;
                    if offset >= total {
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    #[instrument(skip_all)]
    async fn upload(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        let mut stream = request.into_inner();
        let mut received_bytes = 0u64;
        let first = match stream.next().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(status)) => return Err(status),
            None => return Err(ServiceError::Malformed("empty upload stream".into()).into()),
        };
        received_bytes += convert::wire_len(&first);
        self.shared.traffic.add(Direction::Up, received_bytes);
        let Some(pb::update_chunk::Part::Header(header)) = first.part else {
            return Err(ServiceError::Malformed("the first message is not a header".into()).into());
        };

        let result = self
            .receive_update(&header, &mut stream, &mut received_bytes)
            .await;
        match result {
            Ok(shards) => {
                info!(
                    worker_id = header.worker_id,
                    client_id = header.client_id,
                    round = header.round,
                    bytes = received_bytes,
                    "update accepted"
                );
                Ok(Response::new(pb::UploadResponse {
                    bytes_received: received_bytes,
                    shards_accepted: shards,
                }))
            }
            Err(error) => {
                warn!(
                    worker_id = header.worker_id,
                    client_id = header.client_id,
                    round = header.round,
                    reason = error.reason(),
                    %error,
                    "rejecting update"
                );
                Err(error.into())
            }
        }
    }

    #[instrument(skip_all, fields(worker_id = request.get_ref().worker_id))]
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let request = request.into_inner();
        self.authenticate(request.worker_id, &request.session)?;
        let current_round = self
            .shared
            .round
            .lock()
            .expect("round lock")
            .as_ref()
            .map_or(0, |round| round.round);
        Ok(Response::new(pb::HeartbeatResponse { current_round }))
    }

    #[instrument(skip_all, fields(worker_id = request.get_ref().worker_id))]
    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let request = request.into_inner();
        self.authenticate(request.worker_id, &request.session)?;
        if let Some(round) = self.shared.round.lock().expect("round lock").as_mut() {
            for client in round.pending_clients_of(request.worker_id) {
                round.dropped.insert(client);
            }
        }
        self.shared.registry.leave(request.worker_id);
        self.shared.updates.notify_one();
        info!(reason = %request.reason, "worker left");
        Ok(Response::new(pb::LeaveResponse {}))
    }

    #[instrument(skip_all, fields(worker_id = request.get_ref().worker_id, client_id = request.get_ref().client_id))]
    async fn report_failure(
        &self,
        request: Request<pb::FailureReport>,
    ) -> Result<Response<pb::FailureAck>, Status> {
        let request = request.into_inner();
        self.authenticate(request.worker_id, &request.session)?;
        let mut guard = self.shared.round.lock().expect("round lock");
        if let Some(round) = guard
            .as_mut()
            .filter(|r| r.open && r.round == request.round)
            && round.client_worker.get(&request.client_id) == Some(&request.worker_id)
            && !round.received.contains_key(&request.client_id)
        {
            round.dropped.insert(request.client_id);
            warn!(round = request.round, reason = %request.reason, "client failed its local update; dropping it from the round");
        }
        drop(guard);
        self.shared.updates.notify_one();
        Ok(Response::new(pb::FailureAck {}))
    }
}

impl CoordinatorService {
    /// Hands out the task of the open round to `worker`, once per round (again after a rejoin).
    fn take_task(&self, worker: WorkerId) -> Option<pb::RoundTask> {
        let mut guard = self.shared.round.lock().expect("round lock");
        let round = guard.as_mut().filter(|round| round.open)?;
        if round.dispatched.contains(&worker) {
            return None;
        }
        let clients = round.pending_clients_of(worker);
        if clients.is_empty() {
            return None;
        }
        round.dispatched.insert(worker);

        let config = &self.shared.config;
        let deadline_ms = round
            .deadline
            .saturating_duration_since(std::time::Instant::now())
            .as_millis() as u64;
        Some(pb::RoundTask {
            round: round.round,
            model_version: round.model_version,
            clients: clients
                .iter()
                .map(|client| pb::ClientTask {
                    client_id: *client,
                    shard_ids: round.assignment[client].clone(),
                })
                .collect(),
            local: Some(pb::LocalSettings {
                epochs: config.local.epochs,
                lr: config.local.lr,
                batch_size: config.local.batch_size,
                optimizer: config.local.optimizer.clone(),
                momentum: config.local.momentum,
                local_tol: config.local.local_tol,
                seed: config.seed ^ round.round.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            }),
            compression: Some(pb::CompressionSettings {
                top_k: config.compression.top_k,
                quantization: config.compression.quantization.to_string(),
            }),
            deadline_ms,
        })
    }

    /// Reads, checks and decodes a whole upload, then commits it to the open round.
    /// Nothing reaches the round state unless every check passes.
    async fn receive_update(
        &self,
        header: &pb::UpdateHeader,
        stream: &mut Streaming<pb::UpdateChunk>,
        received_bytes: &mut u64,
    ) -> Result<u32, ServiceError> {
        let shared = &self.shared;
        self.authenticate(header.worker_id, &header.session)?;
        let client = header.client_id;
        let (owner, samples) = shared
            .registry
            .client(client)
            .filter(|(owner, _)| *owner == header.worker_id)
            .ok_or(ServiceError::ForeignClient {
                client,
                worker: header.worker_id,
            })?;
        debug_assert_eq!(owner, header.worker_id);
        if header.num_samples != samples {
            return Err(ServiceError::WrongSampleCount {
                client,
                got: header.num_samples,
                expected: samples,
            });
        }
        let assigned = self.check_round(header)?;

        // Collect the encoded bytes of every shard, checking offsets as they arrive.
        let snapshot = shared.snapshot();
        let mut parts: BTreeMap<ShardId, (pb::ShardSegment, Vec<u8>)> = BTreeMap::new();
        let mut complete: Vec<ShardId> = Vec::new();
        while let Some(message) = stream.next().await {
            let message = message.map_err(|status| {
                ServiceError::Malformed(format!("upload stream failed: {}", status.message()))
            })?;
            let size = convert::wire_len(&message);
            *received_bytes += size;
            shared.traffic.add(Direction::Up, size);
            let segment = match message.part {
                Some(pb::update_chunk::Part::Segment(segment)) => segment,
                _ => {
                    return Err(ServiceError::Malformed(
                        "a second header in one upload".into(),
                    ));
                }
            };
            let shard_id = segment.shard_id;
            if !assigned.contains(&shard_id) {
                return Err(ServiceError::ShardNotAssigned {
                    shard: shard_id,
                    client,
                    round: header.round,
                });
            }
            if complete.contains(&shard_id) {
                return Err(ServiceError::DuplicateShard { shard: shard_id });
            }
            let shard = shared
                .layout
                .shard(shard_id)
                .expect("assigned shards exist");
            // No encoding of a shard is larger than a varint count, 10 bytes of varint per
            // position, a scale and a f32 per element.
            let limit = 16 + shard.len() as u64 * 14;
            if segment.shard_bytes > limit {
                return Err(ServiceError::Malformed(format!(
                    "shard {shard_id} claims {} bytes, more than any encoding of {} elements",
                    segment.shard_bytes,
                    shard.len()
                )));
            }
            let entry = parts.entry(shard_id).or_insert_with(|| {
                (
                    segment.clone(),
                    Vec::with_capacity(segment.shard_bytes as usize),
                )
            });
            if segment.offset != entry.1.len() as u64
                || segment.shard_bytes != entry.0.shard_bytes
                || segment.encoding != entry.0.encoding
                || segment.shard_checksum != entry.0.shard_checksum
            {
                return Err(ServiceError::Malformed(format!(
                    "segment of shard {shard_id} at offset {} does not continue the {} bytes received",
                    segment.offset,
                    entry.1.len()
                )));
            }
            entry.1.extend_from_slice(&segment.payload);
            if entry.1.len() as u64 > entry.0.shard_bytes {
                return Err(ServiceError::Malformed(format!(
                    "shard {shard_id} is longer than its declared {} bytes",
                    entry.0.shard_bytes
                )));
            }
            if entry.1.len() as u64 == entry.0.shard_bytes {
                complete.push(shard_id);
            }
        }

        let missing: Vec<ShardId> = assigned
            .iter()
            .copied()
            .filter(|id| !complete.contains(id))
            .collect();
        if !missing.is_empty() {
            return Err(ServiceError::MissingShards { client, missing });
        }

        let mut decoded = BTreeMap::new();
        for (shard_id, (segment, bytes)) in parts {
            let computed = checksum(&bytes);
            if computed != segment.shard_checksum {
                return Err(ServiceError::BadChecksum {
                    shard: shard_id,
                    expected: segment.shard_checksum,
                    computed,
                });
            }
            let encoding = convert::update_encoding(segment.encoding).ok_or_else(|| {
                ServiceError::Malformed(format!(
                    "shard {shard_id} has unknown encoding {}",
                    segment.encoding
                ))
            })?;
            let shard = shared
                .layout
                .shard(shard_id)
                .expect("assigned shards exist");
            let start = shard.range.start;
            let mask = &snapshot.mask;
            let keep = move |i: usize| mask.get(start + i);
            let values = codec::decode_update(encoding, &bytes, shard.len(), Some(&keep)).map_err(
                |source| ServiceError::BadShard {
                    shard: shard_id,
                    source,
                },
            )?;
            decoded.insert(shard_id, values);
        }

        self.commit(header, samples, decoded)
    }

    /// Checks that the header matches the open round; returns the client's assigned shards.
    fn check_round(&self, header: &pb::UpdateHeader) -> Result<Vec<ShardId>, ServiceError> {
        let guard = self.shared.round.lock().expect("round lock");
        check_header(guard.as_ref(), header)
    }

    fn commit(
        &self,
        header: &pb::UpdateHeader,
        weight: u64,
        shards: BTreeMap<ShardId, Vec<f32>>,
    ) -> Result<u32, ServiceError> {
        let count = shards.len() as u32;
        let mut guard = self.shared.round.lock().expect("round lock");
        // The round may have closed, or a twin upload finished, while this one streamed in.
        check_header(guard.as_ref(), header)?;
        let round = guard.as_mut().expect("check_header saw an open round");
        round
            .received
            .insert(header.client_id, ClientUpdate { weight, shards });
        drop(guard);
        self.shared.updates.notify_one();
        Ok(count)
    }
}

fn check_header(
    round: Option<&RoundState>,
    header: &pb::UpdateHeader,
) -> Result<Vec<ShardId>, ServiceError> {
    let round = round
        .filter(|round| round.open)
        .ok_or_else(|| ServiceError::WrongRound {
            got: header.round,
            current: "none (no round is open)".into(),
        })?;
    if round.round != header.round {
        return Err(ServiceError::WrongRound {
            got: header.round,
            current: round.round.to_string(),
        });
    }
    if round.model_version != header.model_version {
        return Err(ServiceError::WrongModelVersion {
            got: header.model_version,
            expected: round.model_version,
            round: round.round,
        });
    }
    if round.received.contains_key(&header.client_id) {
        return Err(ServiceError::DuplicateUpdate {
            client: header.client_id,
            round: round.round,
        });
    }
    round
        .assignment
        .get(&header.client_id)
        .filter(|_| !round.dropped.contains(&header.client_id))
        .cloned()
        .ok_or(ServiceError::ClientNotInRound {
            client: header.client_id,
            round: round.round,
        })
}

fn new_session() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
