//! State shared by the gRPC handlers and the round engine.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedcompress_core::{
    Assignment, ClientId, Mask, ShardId, ShardLayout, TrafficCounters, checksum, codec,
};
use fedcompress_proto::pb;
use tokio::sync::{Notify, watch};

use crate::config::CoordinatorConfig;
use crate::registry::{Registry, WorkerId};

/// One shard of the global model, encoded once per model version for every download.
#[derive(Debug)]
pub struct EncodedShard {
    pub layout: pb::ValueLayout,
    pub payload: Bytes,
    pub checksum: u32,
    pub mask: Bytes,
}

/// An immutable version of the global model.
#[derive(Debug)]
pub struct ModelSnapshot {
    pub version: u64,
    pub params: Vec<f32>,
    pub mask: Mask,
    pub mask_version: u64,
    pub encoded: Vec<EncodedShard>,
}

impl ModelSnapshot {
    /// Encodes `params` for download: dense shards where the mask keeps everything, only the
    /// kept values elsewhere.
    pub fn new(
        layout: &ShardLayout,
        version: u64,
        params: Vec<f32>,
        mask: Mask,
        mask_version: u64,
    ) -> Self {
        let encoded = layout
            .shards()
            .iter()
            .map(|shard| {
                let range = shard.range.clone();
                let kept = mask.count_kept_in(range.clone());
                let mut payload = Vec::with_capacity(kept * 4);
                let value_layout = if kept == shard.len() {
                    codec::put_f32s(&mut payload, params[range.clone()].iter().copied());
                    pb::ValueLayout::Dense
                } else {
                    codec::put_f32s(
                        &mut payload,
                        range.clone().filter(|&i| mask.get(i)).map(|i| params[i]),
                    );
                    pb::ValueLayout::Kept
                };
                EncodedShard {
                    layout: value_layout,
                    checksum: checksum(&payload),
                    payload: Bytes::from(payload),
                    mask: Bytes::from(mask.pack_range(range)),
                }
            })
            .collect();
        Self {
            version,
            params,
            mask,
            mask_version,
            encoded,
        }
    }
}

/// A client's validated update of one round, decoded to dense shards.
#[derive(Debug)]
pub struct ClientUpdate {
    pub weight: u64,
    pub shards: BTreeMap<ShardId, Vec<f32>>,
}

/// The round in progress.
#[derive(Debug)]
pub struct RoundState {
    pub round: u64,
    pub model_version: u64,
    pub assignment: Assignment,
    /// Worker hosting each selected client at selection time.
    pub client_worker: BTreeMap<ClientId, WorkerId>,
    /// Workers that were handed their task.
    pub dispatched: HashSet<WorkerId>,
    pub received: BTreeMap<ClientId, ClientUpdate>,
    /// Selected clients whose worker died or left; the round no longer waits for them.
    pub dropped: BTreeSet<ClientId>,
    pub deadline: Instant,
    pub open: bool,
}

impl RoundState {
    /// Returns true when every selected client has uploaded or was dropped.
    pub fn complete(&self) -> bool {
        self.assignment
            .keys()
            .all(|c| self.received.contains_key(c) || self.dropped.contains(c))
    }

    /// Clients of `worker` in this round that still owe an update.
    pub fn pending_clients_of(&self, worker: WorkerId) -> Vec<ClientId> {
        self.client_worker
            .iter()
            .filter(|(client, w)| {
                **w == worker
                    && !self.received.contains_key(client)
                    && !self.dropped.contains(client)
            })
            .map(|(client, _)| *client)
            .collect()
    }
}

/// Everything the handlers and the engine share.
pub struct Shared {
    pub config: CoordinatorConfig,
    pub layout: ShardLayout,
    pub model_kind: String,
    pub registry: Registry,
    pub model: RwLock<Arc<ModelSnapshot>>,
    pub round: Mutex<Option<RoundState>>,
    /// Bumped whenever a round opens or the run ends; GetTask waits on it.
    pub round_changed: watch::Sender<u64>,
    /// Woken when an update is accepted or a worker leaves; the engine waits on it.
    pub updates: Notify,
    /// Set once the run has ended, with the reason.
    pub finished: watch::Sender<Option<String>>,
    pub traffic: TrafficCounters,
    pub run_config_json: String,
}

impl Shared {
    pub fn snapshot(&self) -> Arc<ModelSnapshot> {
        self.model
            .read()
            .expect("model lock is never poisoned")
            .clone()
    }

    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.config.heartbeat_timeout_secs)
    }

    pub fn finished_reason(&self) -> Option<String> {
        self.finished.borrow().clone()
    }
}
