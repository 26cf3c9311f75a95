//! The round engine.
//!
//! One task drives the run; the gRPC handlers only read the model snapshot and fill the
//! round state. A round goes through these steps:
//!
//! 1. **Select**: `clients_per_round` clients among those whose worker is alive, drawn with
//!    a generator seeded by (seed, round, attempt), so a rerun or a resume draws the same.
//! 2. **Assign**: the shard assignment policy gives each selected client its shards; the
//!    round opens and waiting GetTask calls return the tasks.
//! 3. **Collect**: the round closes when every selected client has uploaded or was dropped
//!    (its worker left or missed heartbeats for `heartbeat_timeout_secs`), or at the
//!    deadline.
//! 4. **Quorum rule**: a round that closes with fewer updates than the quorum is run again
//!    with a fresh selection, at most `max_round_retries` times. After that the run stops with
//!    an error that names the round, the updates received and the quorum, so it never waits
//!    forever.
//! 5. **Aggregate**: per shard, the rule combines the updates of the clients that trained
//!    it, in ascending client id order, and the server step applies the result. A shard
//!    that nobody trained keeps its values. A round whose total sample weight is zero is
//!    skipped with an error and leaves the model unchanged.
//! 6. **Prune**, **evaluate**, **checkpoint**, and check the stop conditions (round limit,
//!    target accuracy, global convergence once the pruning schedule has ended).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedcompress_core::{
    AggregateError, ClientId, Mask, ServerState, TrafficSnapshot, WeightedUpdate, aggregate_shard,
};
use rand::SeedableRng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::checkpoint::{Checkpoint, CheckpointHeader};
use crate::state::{ClientUpdate, ModelSnapshot, RoundState, Shared};

/// Accuracy and loss of the global model on held-out data.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub accuracy: Option<f64>,
    pub loss: f64,
}

/// Evaluates the global model after every round.
pub trait Evaluator: Send + Sync {
    fn evaluate(&self, params: &[f32]) -> anyhow::Result<Evaluation>;
}

/// Decides the mask on pruning rounds.
pub trait Pruner: Send + Sync {
    /// Returns the new mask when `round` is a pruning round, else `None`.
    fn prune(&self, round: u64, params: &[f32], mask: &Mask) -> Option<Mask>;
    /// True when no pruning step is left after `round`.
    fn schedule_done(&self, round: u64) -> bool;
}

/// One line of the run's history: what a round did and what it cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    pub round: u64,
    pub attempts: u32,
    pub clients_selected: usize,
    pub clients_answered: usize,
    pub accuracy: Option<f64>,
    pub loss: Option<f64>,
    pub sparsity: f64,
    pub params_kept: usize,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub seconds: f64,
    /// ‖θ_t − θ_{t−1}‖₂ / ‖θ_{t−1}‖₂.
    pub relative_change: f64,
    pub model_version: u64,
    /// True when the round was skipped (zero total sample weight) and left the model unchanged.
    pub skipped: bool,
    pub pruned: bool,
}

/// Reason the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    RoundLimit,
    TargetAccuracy,
    Converged,
    /// The coordinator was asked to stop; a `--resume` continues the run.
    Shutdown,
    /// The run failed (for example a missed quorum) and will not continue.
    Failed,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::RoundLimit => "round_limit",
            Self::TargetAccuracy => "target_accuracy",
            Self::Converged => "converged",
            Self::Shutdown => "shutdown",
            Self::Failed => "failed",
        })
    }
}

/// The result of a whole run.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    pub reason: StopReason,
    pub rounds: u64,
    pub params: Vec<f32>,
    pub mask: Mask,
    pub traffic: TrafficSnapshot,
    pub history: Vec<RoundSummary>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "only {joined} of {expected} clients joined within {seconds} s; start more workers or lower --clients"
    )]
    JoinTimeout {
        joined: usize,
        expected: usize,
        seconds: f64,
    },
    #[error(
        "round {round} closed with {received} updates, below the quorum of {quorum}, after {attempts} attempts; the run stopped"
    )]
    QuorumMissed {
        round: u64,
        received: usize,
        quorum: usize,
        attempts: u32,
    },
    #[error("no worker is alive to run round {0}")]
    NoLiveClients(u64),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error("failed to evaluate the model: {0}")]
    Evaluate(anyhow::Error),
    #[error("invalid shard assignment: {0}")]
    Assignment(#[from] fedcompress_core::AssignmentError),
}

/// State the engine carries from round to round and through a checkpoint.
pub(crate) struct EngineState {
    pub next_round: u64,
    pub server_state: ServerState,
    pub converged_streak: u32,
    pub history: Vec<RoundSummary>,
}

pub(crate) struct Engine {
    pub shared: Arc<Shared>,
    pub evaluator: Option<Arc<dyn Evaluator>>,
    pub pruner: Option<Arc<dyn Pruner>>,
    pub events: Option<mpsc::UnboundedSender<RoundSummary>>,
    pub state: EngineState,
}

enum Collected {
    Quorum(BTreeMap<ClientId, ClientUpdate>, usize),
    Missed { received: usize, quorum: usize },
}

impl Engine {
    pub async fn run(
        mut self,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<RunOutcome, RunError> {
        let config = self.shared.config.clone();
        if self.state.next_round > config.rounds {
            info!(
                rounds = config.rounds,
                "the checkpoint already holds every round"
            );
            return Ok(self.finish(StopReason::RoundLimit));
        }
        self.wait_for_clients(&mut shutdown).await?;
        let mut reason = StopReason::RoundLimit;

        while self.state.next_round <= config.rounds {
            if *shutdown.borrow() {
                reason = StopReason::Shutdown;
                break;
            }
            let round = self.state.next_round;
            let started = Instant::now();
            let mut attempt = 1;
            let (updates, selected) = loop {
                match self.collect_round(round, attempt, &mut shutdown).await? {
                    Collected::Quorum(updates, selected) => break (updates, selected),
                    Collected::Missed { received, quorum } => {
                        if *shutdown.borrow() {
                            return Ok(self.finish(StopReason::Shutdown));
                        }
                        if attempt > config.max_round_retries {
                            let error = RunError::QuorumMissed {
                                round,
                                received,
                                quorum,
                                attempts: attempt,
                            };
                            error!(%error, "stopping the run");
                            self.finish(StopReason::Failed);
                            return Err(error);
                        }
                        warn!(
                            round,
                            attempt, received, quorum, "round missed its quorum; running it again"
                        );
                        attempt += 1;
                    }
                }
            };

            // A stop request discards the open round, so the model stays that of the last
            // checkpoint and a resumed run repeats this round with every client.
            if *shutdown.borrow() {
                reason = StopReason::Shutdown;
                break;
            }
            let summary = self
                .close_round(round, attempt, selected, updates, started)
                .await?;
            self.state.next_round = round + 1;
            let stop = self.stop_condition(&summary);
            self.state.history.push(summary.clone());
            self.save_checkpoint(round)?;
            if let Some(events) = &self.events {
                let _ = events.send(summary);
            }
            if let Some(stop) = stop {
                reason = stop;
                break;
            }
        }
        Ok(self.finish(reason))
    }

    async fn wait_for_clients(
        &self,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), RunError> {
        let expected = self.shared.config.clients;
        let timeout = Duration::from_secs_f64(self.shared.config.join_timeout_secs);
        let deadline = Instant::now() + timeout;
        info!(expected, "waiting for clients to join");
        loop {
            let joined = self.shared.registry.num_clients();
            if joined >= expected {
                info!(joined, "all clients joined");
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline || *shutdown.borrow() {
                return Err(RunError::JoinTimeout {
                    joined,
                    expected,
                    seconds: timeout.as_secs_f64(),
                });
            }
            tokio::select! {
                _ = self.shared.updates.notified() => {}
                _ = tokio::time::sleep((deadline - now).min(Duration::from_secs(1))) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Opens round `round`, waits for its updates and closes it.
    async fn collect_round(
        &self,
        round: u64,
        attempt: u32,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<Collected, RunError> {
        let shared = &self.shared;
        let config = &shared.config;
        let live = shared.registry.live_clients(shared.heartbeat_timeout());
        if live.is_empty() {
            return Err(RunError::NoLiveClients(round));
        }
        let wanted = config.clients_per_round().min(live.len());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            config.seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(attempt) << 48,
        );
        let mut selected: Vec<ClientId> = live.choose_multiple(&mut rng, wanted).copied().collect();
        selected.sort_unstable();
        let assignment = config.assignment.assign(&shared.layout, &selected, round)?;
        let client_worker = selected
            .iter()
            .filter_map(|&c| shared.registry.client(c).map(|(w, _)| (c, w)))
            .collect();

        let timeout = Duration::from_secs_f64(config.round_timeout_secs);
        let now = Instant::now();
        let deadline = now + timeout;
        {
            let mut guard = shared.round.lock().expect("round lock");
            *guard = Some(RoundState {
                round,
                model_version: shared.snapshot().version,
                assignment,
                client_worker,
                dispatched: Default::default(),
                received: BTreeMap::new(),
                dropped: Default::default(),
                deadline,
                open: true,
            });
        }
        shared.round_changed.send_modify(|epoch| *epoch += 1);
        info!(round, attempt, clients = ?selected, "round started");

        loop {
            if self.drop_dead_clients() || Instant::now() >= deadline || *shutdown.borrow() {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::select! {
                _ = shared.updates.notified() => {}
                _ = tokio::time::sleep(left.min(Duration::from_secs(1))) => {}
                _ = shutdown.changed() => {}
            }
        }

        let mut guard = shared.round.lock().expect("round lock");
        let state = guard.as_mut().expect("the engine opened this round");
        state.open = false;
        let received = std::mem::take(&mut state.received);
        let quorum = config.quorum_for(selected.len());
        for client in &state.dropped {
            warn!(round, client_id = client, "client dropped from the round");
        }
        if received.len() >= quorum {
            Ok(Collected::Quorum(received, selected.len()))
        } else {
            Ok(Collected::Missed {
                received: received.len(),
                quorum,
            })
        }
    }

    /// Marks clients of dead or departed workers as dropped; returns true when the round
    /// has nothing left to wait for.
    fn drop_dead_clients(&self) -> bool {
        let shared = &self.shared;
        let timeout = shared.heartbeat_timeout();
        let mut guard = shared.round.lock().expect("round lock");
        let state = guard.as_mut().expect("the engine opened this round");
        let newly_dead: Vec<(ClientId, u64)> = state
            .client_worker
            .iter()
            .filter(|(client, worker)| {
                !state.received.contains_key(client)
                    && !state.dropped.contains(client)
                    && !shared.registry.is_alive(**worker, timeout)
            })
            .map(|(c, w)| (*c, *w))
            .collect();
        for (client, worker) in newly_dead {
            warn!(
                round = state.round,
                client_id = client,
                worker_id = worker,
                "worker is silent; dropping its client"
            );
            state.dropped.insert(client);
        }
        state.complete()
    }

    async fn close_round(
        &mut self,
        round: u64,
        attempts: u32,
        selected: usize,
        updates: BTreeMap<ClientId, ClientUpdate>,
        started: Instant,
    ) -> Result<RoundSummary, RunError> {
        let shared = self.shared.clone();
        let old = shared.snapshot();
        let answered = updates.len();
        let total_weight: u64 = updates.values().map(|u| u.weight).sum();
        let mut server_state = std::mem::take(&mut self.state.server_state);

        let skipped = total_weight == 0;
        let (params, server_state) = if skipped {
            error!(
                round,
                updates = answered,
                error = %AggregateError::ZeroWeight,
                "skipping the round; the model is unchanged"
            );
            (old.params.clone(), server_state)
        } else {
            let shared = shared.clone();
            let old = old.clone();
            tokio::task::spawn_blocking(move || {
                let params = aggregate_round(&shared, &old, &updates, &mut server_state);
                (params, server_state)
            })
            .await
            .expect("aggregation task does not panic")
        };
        self.state.server_state = server_state;

        let mut params = params;
        let mut mask = old.mask.clone();
        let mut mask_version = old.mask_version;
        let mut pruned = false;
        if let Some(pruner) = &self.pruner
            && let Some(new_mask) = pruner.prune(round, &params, &mask)
        {
            mask = new_mask;
            mask_version += 1;
            pruned = true;
        }
        mask.apply(0, &mut params);
        let relative_change = relative_change(&old.params, &params);

        let evaluation = match &self.evaluator {
            Some(evaluator) => {
                let evaluator = evaluator.clone();
                let params = params.clone();
                Some(
                    tokio::task::spawn_blocking(move || evaluator.evaluate(&params))
                        .await
                        .expect("evaluation task does not panic")
                        .map_err(RunError::Evaluate)?,
                )
            }
            None => None,
        };

        let version = old.version + 1;
        let kept = mask.count_kept();
        let sparsity = mask.sparsity();
        let snapshot = ModelSnapshot::new(&shared.layout, version, params, mask, mask_version);
        *shared.model.write().expect("model lock") = Arc::new(snapshot);
        let traffic = shared.traffic.finish_round();

        let summary = RoundSummary {
            round,
            attempts,
            clients_selected: selected,
            clients_answered: answered,
            accuracy: evaluation.and_then(|e| e.accuracy),
            loss: evaluation.map(|e| e.loss),
            sparsity,
            params_kept: kept,
            bytes_up: traffic.bytes_up,
            bytes_down: traffic.bytes_down,
            seconds: started.elapsed().as_secs_f64(),
            relative_change,
            model_version: version,
            skipped,
            pruned,
        };
        info!(
            round,
            accuracy = summary.accuracy,
            loss = summary.loss,
            sparsity,
            bytes_up = traffic.bytes_up,
            bytes_down = traffic.bytes_down,
            seconds = summary.seconds,
            "round finished"
        );
        Ok(summary)
    }

    fn stop_condition(&mut self, summary: &RoundSummary) -> Option<StopReason> {
        let config = &self.shared.config;
        if let (Some(target), Some(accuracy)) = (config.target_accuracy, summary.accuracy)
            && accuracy >= target
        {
            return Some(StopReason::TargetAccuracy);
        }
        let schedule_done = self
            .pruner
            .as_ref()
            .is_none_or(|p| p.schedule_done(summary.round));
        if config.tol > 0.0 && schedule_done && summary.relative_change < config.tol {
            self.state.converged_streak += 1;
        } else {
            self.state.converged_streak = 0;
        }
        (config.tol > 0.0 && self.state.converged_streak >= config.patience)
            .then_some(StopReason::Converged)
    }

    fn save_checkpoint(&self, round: u64) -> Result<(), RunError> {
        let Some(dir) = &self.shared.config.checkpoint_dir else {
            return Ok(());
        };
        let snapshot = self.shared.snapshot();
        let checkpoint = Checkpoint {
            header: CheckpointHeader {
                round,
                model_version: snapshot.version,
                mask_version: snapshot.mask_version,
                model_kind: self.shared.model_kind.clone(),
                tensors: self.shared.layout.tensors().to_vec(),
                traffic: self.shared.traffic.totals(),
                converged_streak: self.state.converged_streak,
                history: self
                    .state
                    .history
                    .iter()
                    .map(|s| serde_json::to_value(s).expect("summary serializes"))
                    .collect(),
            },
            params: snapshot.params.clone(),
            mask: snapshot.mask.clone(),
            server_state: self.state.server_state.clone(),
        };
        checkpoint.save(dir, self.shared.config.keep_checkpoints)?;
        Ok(())
    }

    fn finish(&mut self, reason: StopReason) -> RunOutcome {
        let shared = &self.shared;
        shared.finished.send_replace(Some(reason.to_string()));
        shared.round_changed.send_modify(|epoch| *epoch += 1);
        let snapshot = shared.snapshot();
        info!(%reason, rounds = self.state.history.len(), "run finished");
        RunOutcome {
            reason,
            rounds: self.state.history.len() as u64,
            params: snapshot.params.clone(),
            mask: snapshot.mask.clone(),
            traffic: shared.traffic.totals(),
            history: std::mem::take(&mut self.state.history),
        }
    }
}

/// Aggregates every shard that received updates and applies the server step.
fn aggregate_round(
    shared: &Shared,
    old: &ModelSnapshot,
    updates: &BTreeMap<ClientId, ClientUpdate>,
    server_state: &mut ServerState,
) -> Vec<f32> {
    let mut params = old.params.clone();
    let total = params.len();
    for shard in shared.layout.shards() {
        let shard_updates: Vec<WeightedUpdate<'_>> = updates
            .iter()
            .filter_map(|(&client, update)| {
                update.shards.get(&shard.id).map(|delta| WeightedUpdate {
                    client,
                    weight: update.weight,
                    delta,
                })
            })
            .collect();
        if shard_updates.is_empty() {
            continue;
        }
        let result = aggregate_shard(shared.config.aggregation, &shard_updates, shard.len())
            .and_then(|aggregate| {
                let range = shard.range.clone();
                shared.config.server_step.apply(
                    &mut params[range.clone()],
                    range.start,
                    &aggregate,
                    server_state,
                    total,
                )
            });
        if let Err(error) = result {
            error!(shard = shard.id, %error, "shard left unchanged");
        }
    }
    params
}

/// ‖new − old‖₂ / ‖old‖₂, or ‖new‖₂ when `old` is zero.
pub fn relative_change(old: &[f32], new: &[f32]) -> f64 {
    let mut diff = 0.0f64;
    let mut norm = 0.0f64;
    for (&a, &b) in old.iter().zip(new) {
        diff += (b as f64 - a as f64).powi(2);
        norm += (a as f64).powi(2);
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}
