//! Shard assignment: which shards each selected client trains and uploads in a round.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{ClientId, ShardId, ShardLayout};

/// Policy that spreads the shards of the model over the clients of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum AssignmentPolicy {
    /// Every client trains and uploads every shard (plain FedAvg).
    All,
    /// The shards are cut into one group per client of about equal size. The groups rotate
    /// by one client every round, so over N rounds every client trains every group once.
    Partition,
    /// Like `Partition`, but each group goes to this many consecutive clients.
    Replicas(usize),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssignmentError {
    #[error(
        "invalid shard assignment `{0}`: expected `all`, `partition` or `replicas:K` with K >= 1"
    )]
    Parse(String),
    #[error("invalid shard assignment replicas:{replicas}: a round has only {clients} clients")]
    TooManyReplicas { replicas: usize, clients: usize },
}

impl FromStr for AssignmentPolicy {
    type Err = AssignmentError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "all" => Ok(Self::All),
            "partition" => Ok(Self::Partition),
            other => other
                .strip_prefix("replicas:")
                .and_then(|k| k.parse::<usize>().ok())
                .filter(|&k| k >= 1)
                .map(Self::Replicas)
                .ok_or_else(|| AssignmentError::Parse(text.to_string())),
        }
    }
}

impl TryFrom<String> for AssignmentPolicy {
    type Error = AssignmentError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<AssignmentPolicy> for String {
    fn from(policy: AssignmentPolicy) -> Self {
        policy.to_string()
    }
}

impl fmt::Display for AssignmentPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => write!(f, "all"),
            Self::Partition => write!(f, "partition"),
            Self::Replicas(k) => write!(f, "replicas:{k}"),
        }
    }
}

/// Shards per client for one round; every list is ascending.
pub type Assignment = BTreeMap<ClientId, Vec<ShardId>>;

impl AssignmentPolicy {
    /// Assigns the shards of `layout` to `clients` for round `round`. Clients are taken in
    /// ascending id order, so the result does not depend on the order of `clients`.
    pub fn assign(
        &self,
        layout: &ShardLayout,
        clients: &[ClientId],
        round: u64,
    ) -> Result<Assignment, AssignmentError> {
        let mut sorted = clients.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let n = sorted.len();
        let mut assignment: Assignment = sorted.iter().map(|&c| (c, Vec::new())).collect();
        if n == 0 {
            return Ok(assignment);
        }

        let replicas = match *self {
            Self::All => {
                let every: Vec<ShardId> = layout.shards().iter().map(|s| s.id).collect();
                for shards in assignment.values_mut() {
                    shards.clone_from(&every);
                }
                return Ok(assignment);
            }
            Self::Partition => 1,
            Self::Replicas(k) if k > n => {
                return Err(AssignmentError::TooManyReplicas {
                    replicas: k,
                    clients: n,
                });
            }
            Self::Replicas(k) => k,
        };

        let rotation = (round % n as u64) as usize;
        for (group, shards) in balanced_groups(layout, n).into_iter().enumerate() {
            for replica in 0..replicas {
                let client = sorted[(group + rotation + replica) % n];
                assignment
                    .get_mut(&client)
                    .expect("every sorted client has an entry")
                    .extend_from_slice(&shards);
            }
        }
        for shards in assignment.values_mut() {
            shards.sort_unstable();
        }
        Ok(assignment)
    }
}

/// Cuts the ordered shard list into `groups` contiguous groups of about equal element count.
fn balanced_groups(layout: &ShardLayout, groups: usize) -> Vec<Vec<ShardId>> {
    let total = layout.total_elems() as f64;
    let mut result = vec![Vec::new(); groups];
    let mut done = 0usize;
    for shard in layout.shards() {
        // The group whose share of the model contains the shard's midpoint.
        let middle = done as f64 + shard.len() as f64 / 2.0;
        let group = ((middle / total * groups as f64) as usize).min(groups - 1);
        result[group].push(shard.id);
        done += shard.len();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TensorSpec;

    fn layout() -> ShardLayout {
        let specs = vec![
            TensorSpec::new("a", [40]),
            TensorSpec::new("b", []),
            TensorSpec::new("c", [7, 3]),
            TensorSpec::new("d", [30]),
        ];
        ShardLayout::new(specs, 8).unwrap()
    }

    #[test]
    fn assign_parses_policies() {
        assert_eq!("all".parse(), Ok(AssignmentPolicy::All));
        assert_eq!("partition".parse(), Ok(AssignmentPolicy::Partition));
        assert_eq!("replicas:2".parse(), Ok(AssignmentPolicy::Replicas(2)));
        for bad in ["", "replicas:0", "replicas:x", "some"] {
            assert!(bad.parse::<AssignmentPolicy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn assign_all_gives_every_shard() {
        let layout = layout();
        let assignment = AssignmentPolicy::All.assign(&layout, &[4, 2], 3).unwrap();
        assert_eq!(assignment.len(), 2);
        for shards in assignment.values() {
            assert_eq!(shards.len(), layout.num_shards());
        }
    }

    #[test]
    fn assign_partition_is_disjoint_and_complete() {
        let layout = layout();
        let clients = [10, 11, 12];
        for round in 0..5 {
            let assignment = AssignmentPolicy::Partition
                .assign(&layout, &clients, round)
                .unwrap();
            let mut all: Vec<ShardId> = assignment.values().flatten().copied().collect();
            all.sort_unstable();
            let expected: Vec<ShardId> = (0..layout.num_shards() as ShardId).collect();
            assert_eq!(all, expected, "round {round}");
        }
    }

    #[test]
    fn assign_partition_rotation_covers_every_shard() {
        let layout = layout();
        let clients = [1, 2, 3];
        let mut seen: BTreeMap<ClientId, Vec<ShardId>> = BTreeMap::new();
        for round in 0..3 {
            let assignment = AssignmentPolicy::Partition
                .assign(&layout, &clients, round)
                .unwrap();
            for (client, shards) in assignment {
                seen.entry(client).or_default().extend(shards);
            }
        }
        for (client, mut shards) in seen {
            shards.sort_unstable();
            assert_eq!(shards.len(), layout.num_shards(), "client {client}");
        }
    }

    #[test]
    fn assign_partition_balances_sizes() {
        let specs = vec![TensorSpec::new("w", [1000]), TensorSpec::new("b", [10])];
        let layout = ShardLayout::new(specs, 50).unwrap();
        let assignment = AssignmentPolicy::Partition
            .assign(&layout, &[0, 1, 2, 3], 0)
            .unwrap();
        for shards in assignment.values() {
            let elems: usize = shards
                .iter()
                .map(|&id| layout.shard(id).unwrap().len())
                .sum();
            assert!((200..=310).contains(&elems), "unbalanced group of {elems}");
        }
    }

    #[test]
    fn assign_replicas_gives_k_copies() {
        let layout = layout();
        let assignment = AssignmentPolicy::Replicas(2)
            .assign(&layout, &[0, 1, 2], 1)
            .unwrap();
        let total: usize = assignment.values().map(Vec::len).sum();
        assert_eq!(total, 2 * layout.num_shards());
        assert_eq!(
            AssignmentPolicy::Replicas(4).assign(&layout, &[0, 1, 2], 0),
            Err(AssignmentError::TooManyReplicas {
                replicas: 4,
                clients: 3
            })
        );
    }
}
