//! The local update: how a client turns the global parameters into its own.

use fedcompress_core::{ClientId, Mask, TensorSpec};

/// Local training settings of one round, as the coordinator sent them.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalSettings {
    pub round: u64,
    pub epochs: u32,
    pub lr: f64,
    pub batch_size: u32,
    /// "sgd" or "adam".
    pub optimizer: String,
    pub momentum: f64,
    pub local_tol: f64,
    /// Seed of this round's shuffling; the same for every client of the round.
    pub seed: u64,
}

/// The training side of a worker: its clients and their local update.
pub trait LocalUpdate: Send + Sync + 'static {
    /// Clients hosted by this worker, with their sample counts.
    fn clients(&self) -> Vec<(ClientId, u64)>;

    /// Checks that this workload can train the model the coordinator announced.
    fn check_model(&self, kind: &str, tensors: &[TensorSpec]) -> anyhow::Result<()>;

    /// Trains `client` from `params`; returns its new parameters. Pruned parameters must
    /// stay zero.
    fn train(
        &self,
        client: ClientId,
        params: &[f32],
        mask: &Mask,
        settings: &LocalSettings,
    ) -> anyhow::Result<Vec<f32>>;
}

/// A least-squares workload on synthetic data, for tests and benchmarks of the cluster
/// itself: client `c` minimizes ½‖θ − t_c‖², where the target t_c is drawn from the seed and
/// the client id. Each epoch is one gradient step θ ← θ − lr·(θ − t_c), so FedAvg converges
/// to the sample-weighted mean of the targets.
#[derive(Clone, Debug)]
pub struct SyntheticUpdate {
    clients: Vec<(ClientId, u64)>,
    seed: u64,
}

impl SyntheticUpdate {
    /// Clients with sample counts drawn from the seed (between 100 and 999).
    pub fn new(clients: &[ClientId], seed: u64) -> Self {
        let clients = clients
            .iter()
            .map(|&c| (c, 100 + mix(seed ^ 0xA5A5, u64::from(c)) % 900))
            .collect();
        Self { clients, seed }
    }

    /// Clients with the given sample counts.
    pub fn with_samples(clients: Vec<(ClientId, u64)>, seed: u64) -> Self {
        Self { clients, seed }
    }

    /// Returns the target of `client` at parameter `index`, in [-1, 1).
    pub fn target(&self, client: ClientId, index: usize) -> f32 {
        let bits = mix(self.seed ^ u64::from(client) << 40, index as u64);
        ((bits >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// SplitMix64 of `a` and `b`: a cheap, well-mixed hash.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a
        .wrapping_add(b.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl LocalUpdate for SyntheticUpdate {
    fn clients(&self) -> Vec<(ClientId, u64)> {
        self.clients.clone()
    }

    fn check_model(&self, kind: &str, _tensors: &[TensorSpec]) -> anyhow::Result<()> {
        anyhow::ensure!(
            kind == "synthetic",
            "invalid workload: this worker runs the synthetic workload, but the coordinator trains a `{kind}` model; start the worker with the data for that model"
        );
        Ok(())
    }

    fn train(
        &self,
        client: ClientId,
        params: &[f32],
        mask: &Mask,
        settings: &LocalSettings,
    ) -> anyhow::Result<Vec<f32>> {
        anyhow::ensure!(
            mask.len() == params.len(),
            "mask has {} bits for {} parameters",
            mask.len(),
            params.len()
        );
        let lr = settings.lr as f32;
        let mut local = params.to_vec();
        for (index, value) in local.iter_mut().enumerate() {
            if !mask.get(index) {
                *value = 0.0;
                continue;
            }
            let target = self.target(client, index);
            for _ in 0..settings.epochs {
                *value -= lr * (*value - target);
            }
        }
        Ok(local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(epochs: u32) -> LocalSettings {
        LocalSettings {
            round: 1,
            epochs,
            lr: 0.5,
            batch_size: 1,
            optimizer: "sgd".into(),
            momentum: 0.0,
            local_tol: 0.0,
            seed: 0,
        }
    }

    #[test]
    fn synthetic_moves_toward_target() {
        let update = SyntheticUpdate::new(&[3], 7);
        let params = vec![0.0f32; 16];
        let mask = Mask::all_kept(16);
        let trained = update.train(3, &params, &mask, &settings(20)).unwrap();
        for (index, value) in trained.iter().enumerate() {
            assert!((value - update.target(3, index)).abs() < 1e-5);
        }
    }

    #[test]
    fn synthetic_keeps_pruned_zero() {
        let update = SyntheticUpdate::new(&[0], 1);
        let mut mask = Mask::all_kept(8);
        mask.set(2, false);
        let trained = update.train(0, &[1.0; 8], &mask, &settings(3)).unwrap();
        assert_eq!(trained[2], 0.0);
        assert_ne!(trained[3], 1.0);
    }

    #[test]
    fn synthetic_targets_are_spread() {
        let update = SyntheticUpdate::new(&[0, 1], 1);
        let values: Vec<f32> = (0..1000).map(|i| update.target(0, i)).collect();
        assert!(values.iter().all(|v| (-1.0..1.0).contains(v)));
        let mean = values.iter().sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.1, "mean {mean}");
        assert_ne!(update.target(0, 5), update.target(1, 5));
    }
}
