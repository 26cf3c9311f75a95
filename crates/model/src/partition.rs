use std::fmt;
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ModelError;

/// Rule that splits the training samples over clients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Partition {
    /// Uniformly at random, in client sizes that differ by at most one.
    Iid,
    /// Label skew: for each class, client shares drawn from a symmetric Dirichlet(α).
    /// Small α gives each client few classes, large α approaches IID.
    Dirichlet(f64),
    /// Each client gets K shards whose samples share one label, so it has at most K labels.
    Shards(usize),
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Partition::Iid => f.write_str("iid"),
            Partition::Dirichlet(alpha) => write!(f, "dirichlet:{alpha}"),
            Partition::Shards(shards) => write!(f, "shards:{shards}"),
        }
    }
}

impl FromStr for Partition {
    type Err = ModelError;

    /// Parses `iid`, `dirichlet:ALPHA` (ALPHA finite and > 0) or `shards:K` (K >= 1).
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| ModelError::InvalidPartition {
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let partition = match value.split_once(':') {
            None if value == "iid" => Partition::Iid,
            Some(("dirichlet", alpha)) => Partition::Dirichlet(
                alpha
                    .parse()
                    .map_err(|_| invalid("ALPHA is not a number"))?,
            ),
            Some(("shards", shards)) => Partition::Shards(
                shards
                    .parse()
                    .map_err(|_| invalid("K is not a whole number"))?,
            ),
            _ => return Err(invalid("unknown partition")),
        };
        partition.validate()?;
        Ok(partition)
    }
}

impl Partition {
    /// Checks the parameter: α finite and > 0, K >= 1.
    pub fn validate(&self) -> Result<(), ModelError> {
        let reason = match *self {
            Partition::Dirichlet(alpha) if !(alpha.is_finite() && alpha > 0.0) => {
                "ALPHA must be finite and > 0"
            }
            Partition::Shards(0) => "K must be at least 1",
            _ => return Ok(()),
        };
        Err(ModelError::InvalidPartition {
            value: self.to_string(),
            reason: reason.to_string(),
        })
    }
}

impl Serialize for Partition {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Partition {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        value.parse().map_err(serde::de::Error::custom)
    }
}

/// Splits the sample indices `0..labels.len()` over `num_clients` clients.
///
/// Every index goes to exactly one client, every client gets at least one, and each client's
/// indices are sorted. The same inputs and seed give the same split.
pub fn partition(
    labels: &[u8],
    num_clients: usize,
    partition: &Partition,
    seed: u64,
) -> Result<Vec<Vec<usize>>, ModelError> {
    let impossible = |reason: String| ModelError::PartitionImpossible {
        samples: labels.len(),
        clients: num_clients,
        reason,
    };
    if num_clients == 0 {
        return Err(impossible(
            "the number of clients must be at least 1".to_string(),
        ));
    }
    if labels.len() < num_clients {
        return Err(impossible(
            "every client needs at least one sample; use fewer clients".to_string(),
        ));
    }

    partition.validate()?;

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut clients = match *partition {
        Partition::Iid => split_iid(labels.len(), num_clients, &mut rng),
        Partition::Dirichlet(alpha) => split_dirichlet(labels, num_clients, alpha, &mut rng),
        Partition::Shards(shards) => {
            split_shards(labels, num_clients, shards, &mut rng).map_err(impossible)?
        }
    };
    for client in &mut clients {
        client.sort_unstable();
    }
    Ok(clients)
}

fn split_iid(len: usize, num_clients: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(rng);
    split_evenly(&order, num_clients)
        .into_iter()
        .map(<[usize]>::to_vec)
        .collect()
}

/// Cuts `items` into `parts` contiguous pieces whose lengths differ by at most one.
fn split_evenly<T>(items: &[T], parts: usize) -> Vec<&[T]> {
    let base = items.len() / parts;
    let extra = items.len() % parts;
    let mut pieces = Vec::with_capacity(parts);
    let mut start = 0;
    for part in 0..parts {
        let len = base + usize::from(part < extra);
        pieces.push(&items[start..start + len]);
        start += len;
    }
    pieces
}

/// Indices of each label present, in label order, each list shuffled.
fn indices_by_label(labels: &[u8], rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let mut by_label = vec![Vec::new(); 256];
    for (index, &label) in labels.iter().enumerate() {
        by_label[usize::from(label)].push(index);
    }
    by_label.retain(|indices| !indices.is_empty());
    for indices in &mut by_label {
        indices.shuffle(rng);
    }
    by_label
}

fn split_dirichlet(
    labels: &[u8],
    num_clients: usize,
    alpha: f64,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<usize>> {
    // A symmetric Dirichlet draw is a vector of Gamma(α, 1) draws divided by their sum.
    let gamma = Gamma::new(alpha, 1.0).expect("partition() checked that α is finite and > 0");
    let mut clients = vec![Vec::new(); num_clients];

    for class_indices in indices_by_label(labels, rng) {
        let mut weights: Vec<f64> = (0..num_clients).map(|_| gamma.sample(rng)).collect();
        let total: f64 = weights.iter().sum();
        if total > 0.0 {
            weights.iter_mut().for_each(|weight| *weight /= total);
        } else {
            // Every draw underflowed, which happens for tiny α: the limit puts the whole
            // class on one client.
            weights.fill(0.0);
            weights[rng.random_range(0..num_clients)] = 1.0;
        }

        // Cut points at the rounded cumulative shares, so the pieces add up to the class.
        let len = class_indices.len();
        let mut start = 0;
        let mut cumulative = 0.0;
        for (client, weight) in weights.iter().enumerate() {
            cumulative += weight;
            let end = if client + 1 == num_clients {
                len
            } else {
                ((cumulative * len as f64).round() as usize).clamp(start, len)
            };
            clients[client].extend_from_slice(&class_indices[start..end]);
            start = end;
        }
    }

    // Small α can leave clients empty. Each empty client takes one sample from the client
    // that has the most, which changes the label distribution as little as possible.
    for empty in 0..num_clients {
        if clients[empty].is_empty() {
            let largest = (0..num_clients)
                .max_by_key(|&client| (clients[client].len(), std::cmp::Reverse(client)))
                .expect("num_clients >= 1");
            let sample = clients[largest]
                .pop()
                .expect("labels.len() >= num_clients leaves a client with two or more samples");
            clients[empty].push(sample);
        }
    }
    clients
}

fn split_shards(
    labels: &[u8],
    num_clients: usize,
    shards_per_client: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, String> {
    let by_label = indices_by_label(labels, rng);
    let num_shards = num_clients
        .checked_mul(shards_per_client)
        .ok_or_else(|| "too many shards".to_string())?;
    if num_shards < by_label.len() {
        return Err(format!(
            "shards:{shards_per_client} makes {num_shards} single-label shards but the data has \
             {} labels; raise K or the number of clients",
            by_label.len()
        ));
    }
    if num_shards > labels.len() {
        return Err(format!(
            "shards:{shards_per_client} makes {num_shards} shards, more than there are samples; \
             lower K or the number of clients"
        ));
    }

    // Shards per label, so that shard sizes are as equal as possible: each label gets one,
    // then each further shard goes to the label whose shards are currently the largest.
    let mut label_shards = vec![1usize; by_label.len()];
    for _ in by_label.len()..num_shards {
        let label = (0..by_label.len())
            .filter(|&label| label_shards[label] < by_label[label].len())
            .max_by(|&a, &b| {
                // Compare len_a / shards_a with len_b / shards_b without division; the
                // lower label wins a tie.
                let lhs = by_label[a].len() * label_shards[b];
                let rhs = by_label[b].len() * label_shards[a];
                lhs.cmp(&rhs).then(b.cmp(&a))
            })
            .expect("num_shards <= labels.len() leaves a label with room for another shard");
        label_shards[label] += 1;
    }

    let mut shards: Vec<&[usize]> = Vec::with_capacity(num_shards);
    for (indices, &count) in by_label.iter().zip(&label_shards) {
        shards.extend(split_evenly(indices, count));
    }
    shards.shuffle(rng);

    Ok(shards
        .chunks(shards_per_client)
        .map(|client_shards| client_shards.concat())
        .collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;
    use crate::data::load_dataset;

    fn subset_labels() -> Vec<u8> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist-subset");
        load_dataset(&dir).unwrap().0.labels
    }

    /// Asserts that every index appears exactly once and every client has samples.
    fn assert_covers(clients: &[Vec<usize>], len: usize, what: &str) {
        let mut seen = vec![false; len];
        for (client, indices) in clients.iter().enumerate() {
            assert!(!indices.is_empty(), "{what}: client {client} is empty");
            for &index in indices {
                assert!(!seen[index], "{what}: index {index} assigned twice");
                seen[index] = true;
            }
        }
        assert!(seen.iter().all(|&s| s), "{what}: some index is unassigned");
    }

    fn specs() -> Vec<Partition> {
        vec![
            Partition::Iid,
            Partition::Dirichlet(0.5),
            Partition::Dirichlet(0.01),
            Partition::Dirichlet(100.0),
            Partition::Shards(1),
            Partition::Shards(2),
        ]
    }

    #[test]
    fn every_partition_covers_each_index_once() {
        let labels = subset_labels();
        for spec in specs() {
            for clients in [1, 7, 10, 100] {
                if matches!(spec, Partition::Shards(k) if k * clients < 10) {
                    // Fewer shards than labels; impossible_partitions_are_rejected covers it.
                    continue;
                }
                let split = partition(&labels, clients, &spec, 42).unwrap();
                assert_eq!(split.len(), clients, "{spec} x {clients}");
                assert_covers(&split, labels.len(), &format!("{spec} x {clients}"));
            }
        }
    }

    #[test]
    fn same_seed_gives_same_partition() {
        let labels = subset_labels();
        for spec in specs() {
            let first = partition(&labels, 10, &spec, 1).unwrap();
            assert_eq!(first, partition(&labels, 10, &spec, 1).unwrap(), "{spec}");
            assert_ne!(first, partition(&labels, 10, &spec, 2).unwrap(), "{spec}");
        }
    }

    #[test]
    fn iid_sizes_differ_by_at_most_one() {
        let split = partition(&subset_labels(), 7, &Partition::Iid, 0).unwrap();
        let sizes: Vec<usize> = split.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![715, 715, 714, 714, 714, 714, 714]);
    }

    #[test]
    fn shards_limit_labels_per_client() {
        let labels = subset_labels();
        for (shards, clients) in [(1, 10), (2, 10), (2, 37), (3, 100)] {
            let split = partition(&labels, clients, &Partition::Shards(shards), 3).unwrap();
            assert_covers(
                &split,
                labels.len(),
                &format!("shards:{shards} x {clients}"),
            );
            for (client, indices) in split.iter().enumerate() {
                let distinct: BTreeSet<u8> = indices.iter().map(|&index| labels[index]).collect();
                assert!(
                    distinct.len() <= shards,
                    "shards:{shards} x {clients}: client {client} has labels {distinct:?}"
                );
            }
        }
    }

    #[test]
    fn small_alpha_skews_labels() {
        let labels = subset_labels();
        // Mean over clients of the share of a client's samples that carry its most common label.
        let top_label_share = |alpha| {
            let split = partition(&labels, 10, &Partition::Dirichlet(alpha), 5).unwrap();
            let total: f64 = split
                .iter()
                .map(|indices| {
                    let mut counts = [0usize; 256];
                    for &index in indices {
                        counts[usize::from(labels[index])] += 1;
                    }
                    *counts.iter().max().unwrap() as f64 / indices.len() as f64
                })
                .sum();
            total / split.len() as f64
        };
        let skewed = top_label_share(0.1);
        let mixed = top_label_share(100.0);
        assert!(skewed > 0.4, "α 0.1: {skewed}");
        assert!(mixed < 0.2, "α 100: {mixed}");
    }

    #[test]
    fn impossible_partitions_are_rejected() {
        let labels = subset_labels();
        let error = partition(&labels[..3], 4, &Partition::Iid, 0)
            .unwrap_err()
            .to_string();
        assert!(error.contains("3 samples over 4 clients"), "{error}");

        let error = partition(&labels, 0, &Partition::Iid, 0)
            .unwrap_err()
            .to_string();
        assert!(error.contains("at least 1"), "{error}");

        let error = partition(&labels, 3, &Partition::Shards(2), 0)
            .unwrap_err()
            .to_string();
        assert!(error.contains("10 labels"), "{error}");

        let error = partition(&labels, 3, &Partition::Dirichlet(f64::INFINITY), 0)
            .unwrap_err()
            .to_string();
        assert!(error.contains("`dirichlet:inf`"), "{error}");

        let error = partition(&labels, 3, &Partition::Shards(0), 0)
            .unwrap_err()
            .to_string();
        assert!(error.contains("`shards:0`"), "{error}");
    }

    #[test]
    fn partition_spec_parses_and_displays() {
        assert_eq!("iid".parse::<Partition>().unwrap(), Partition::Iid);
        assert_eq!(
            "dirichlet:0.5".parse::<Partition>().unwrap(),
            Partition::Dirichlet(0.5)
        );
        assert_eq!(
            "shards:2".parse::<Partition>().unwrap(),
            Partition::Shards(2)
        );
        for spec in specs() {
            assert_eq!(spec.to_string().parse::<Partition>().unwrap(), spec);
        }
        for bad in [
            "dirichlet:0",
            "dirichlet:-1",
            "dirichlet:inf",
            "dirichlet:NaN",
            "dirichlet:",
            "shards:0",
            "shards:1.5",
            "noniid",
            "iid:1",
        ] {
            let error = bad.parse::<Partition>().unwrap_err().to_string();
            assert!(error.contains(&format!("`{bad}`")), "{error}");
            assert!(error.contains("dirichlet:ALPHA"), "{error}");
        }
    }

    #[test]
    fn partition_serde_uses_spec_string() {
        let json = serde_json::to_string(&Partition::Dirichlet(0.3)).unwrap();
        assert_eq!(json, "\"dirichlet:0.3\"");
        assert_eq!(
            serde_json::from_str::<Partition>(&json).unwrap(),
            Partition::Dirichlet(0.3)
        );
        assert!(serde_json::from_str::<Partition>("\"shards:0\"").is_err());
    }
}
