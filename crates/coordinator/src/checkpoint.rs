//! Round checkpoints: everything needed to continue a run after the coordinator dies.
//!
//! A file contains an 8-byte magic, the length of a JSON header as u64, the header, the
//! parameters as f32, the packed mask, the server optimizer state, and a CRC-32 of all
//! bytes before it. Files are written to a temporary name, synced and renamed, so a crash
//! leaves either the old or the new checkpoint, never a torn one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use fedcompress_core::{Mask, ServerState, TensorSpec, TrafficSnapshot, checksum, codec};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"FCCKPT01";

/// The small part of a checkpoint, stored as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointHeader {
    /// Last completed round.
    pub round: u64,
    pub model_version: u64,
    pub mask_version: u64,
    pub model_kind: String,
    pub tensors: Vec<TensorSpec>,
    pub traffic: TrafficSnapshot,
    /// Consecutive rounds under the convergence tolerance.
    pub converged_streak: u32,
    /// Round summaries so far, as JSON objects.
    pub history: Vec<serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub header: CheckpointHeader,
    pub params: Vec<f32>,
    pub mask: Mask,
    pub server_state: ServerState,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("failed to write checkpoint {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to read checkpoint {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid checkpoint {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("no checkpoint found in {0}: run without --resume to start a new run")]
    NotFound(PathBuf),
}

/// Path of the checkpoint of `round` in `dir`.
pub fn checkpoint_path(dir: &Path, round: u64) -> PathBuf {
    dir.join(format!("round-{round:06}.ckpt"))
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.header).expect("checkpoint header serializes");
        let mut out = Vec::with_capacity(self.params.len() * 5 + header.len() + 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        codec::put_f32s(&mut out, self.params.iter().copied());
        out.extend_from_slice(&self.mask.pack_range(0..self.mask.len()));
        for values in [&self.server_state.first, &self.server_state.second] {
            out.extend_from_slice(&(values.len() as u64).to_le_bytes());
            codec::put_f32s(&mut out, values.iter().copied());
        }
        let crc = checksum(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self, CheckpointError> {
        let invalid = |reason: &str| CheckpointError::Invalid {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if bytes.len() < MAGIC.len() + 12 || &bytes[..8] != MAGIC {
            return Err(invalid("not a fedcompress checkpoint (bad magic)"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if checksum(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(invalid("checksum mismatch: the file is damaged"));
        }

        let mut at: usize = 8;
        let mut take = |len: usize| -> Result<&[u8], CheckpointError> {
            let slice = body
                .get(
                    at..at
                        .checked_add(len)
                        .ok_or_else(|| invalid("length overflow"))?,
                )
                .ok_or_else(|| invalid("truncated"))?;
            at += len;
            Ok(slice)
        };
        let read_u64 =
            |slice: &[u8]| u64::from_le_bytes(slice.try_into().expect("8 bytes")) as usize;

        let header_len = read_u64(take(8)?);
        let header: CheckpointHeader = serde_json::from_slice(take(header_len)?)
            .map_err(|e| invalid(&format!("bad header: {e}")))?;
        let total: usize = header.tensors.iter().map(TensorSpec::numel).sum();
        let params = codec::f32s_from_bytes(take(total * 4)?).expect("multiple of 4");
        let mut mask = Mask::all_kept(total);
        mask.unpack_range(0, total, take(total.div_ceil(8))?);
        let mut moments = Vec::new();
        for _ in 0..2 {
            let len = read_u64(take(8)?);
            if len != 0 && len != total {
                return Err(invalid("server state length differs from the model"));
            }
            moments.push(codec::f32s_from_bytes(take(len * 4)?).expect("multiple of 4"));
        }
        let second = moments.pop().expect("two moments");
        let first = moments.pop().expect("two moments");
        Ok(Self {
            header,
            params,
            mask,
            server_state: ServerState { first, second },
        })
    }

    /// Writes the checkpoint of its round into `dir` atomically and keeps only the newest
    /// `keep` checkpoints there (all when `keep` is 0).
    pub fn save(&self, dir: &Path, keep: usize) -> Result<PathBuf, CheckpointError> {
        let path = checkpoint_path(dir, self.header.round);
        let write_error = |source| CheckpointError::Write {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(write_error)?;
        let temporary = path.with_extension("ckpt.tmp");
        let mut file = fs::File::create(&temporary).map_err(write_error)?;
        file.write_all(&self.encode()).map_err(write_error)?;
        file.sync_all().map_err(write_error)?;
        drop(file);
        fs::rename(&temporary, &path).map_err(write_error)?;
        if let Ok(directory) = fs::File::open(dir) {
            // Makes the rename durable; some file systems do not support syncing a directory.
            let _ = directory.sync_all();
        }

        if keep > 0 {
            let mut rounds = list_rounds(dir);
            rounds.sort_unstable();
            let excess = rounds.len().saturating_sub(keep);
            for round in &rounds[..excess] {
                let _ = fs::remove_file(checkpoint_path(dir, *round));
            }
        }
        Ok(path)
    }

    pub fn load(path: &Path) -> Result<Self, CheckpointError> {
        let bytes = fs::read(path).map_err(|source| CheckpointError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::decode(&bytes, path)
    }

    /// Loads the newest readable checkpoint of `dir`, skipping damaged ones.
    pub fn load_latest(dir: &Path) -> Result<Self, CheckpointError> {
        let mut rounds = list_rounds(dir);
        rounds.sort_unstable();
        let mut last_error = None;
        for round in rounds.iter().rev() {
            match Self::load(&checkpoint_path(dir, *round)) {
                Ok(checkpoint) => return Ok(checkpoint),
                Err(error) => {
                    tracing::warn!(%error, "skipping unreadable checkpoint");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| CheckpointError::NotFound(dir.to_path_buf())))
    }
}

fn list_rounds(dir: &Path) -> Vec<u64> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("round-")?
                .strip_suffix(".ckpt")?
                .parse()
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(round: u64) -> Checkpoint {
        let tensors = vec![TensorSpec::new("w", [3, 3]), TensorSpec::new("s", [])];
        let mut mask = Mask::all_kept(10);
        mask.set(4, false);
        Checkpoint {
            header: CheckpointHeader {
                round,
                model_version: round,
                mask_version: 1,
                model_kind: "synthetic".into(),
                tensors,
                traffic: TrafficSnapshot {
                    bytes_up: 5,
                    bytes_down: 9,
                },
                converged_streak: 0,
                history: vec![serde_json::json!({"round": round})],
            },
            params: (0..10).map(|i| i as f32 * 0.5).collect(),
            mask,
            server_state: ServerState {
                first: vec![0.25; 10],
                second: Vec::new(),
            },
        }
    }

    #[test]
    fn checkpoint_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = sample(3);
        let path = checkpoint.save(dir.path(), 2).unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap(), checkpoint);
    }

    #[test]
    fn checkpoint_keeps_newest() {
        let dir = tempfile::tempdir().unwrap();
        for round in 1..=4 {
            sample(round).save(dir.path(), 2).unwrap();
        }
        let mut rounds = list_rounds(dir.path());
        rounds.sort_unstable();
        assert_eq!(rounds, vec![3, 4]);
        assert_eq!(Checkpoint::load_latest(dir.path()).unwrap().header.round, 4);
    }

    #[test]
    fn checkpoint_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        sample(1).save(dir.path(), 0).unwrap();
        let path = sample(2).save(dir.path(), 0).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            Checkpoint::load(&path),
            Err(CheckpointError::Invalid { .. })
        ));
        assert_eq!(Checkpoint::load_latest(dir.path()).unwrap().header.round, 1);
    }
}
