//! The worker's copy of the global model, filled by streaming Downloads.

use fedcompress_core::{Mask, ShardLayout, checksum, codec};
use fedcompress_proto::{convert, pb};
use pb::coordinator_client::CoordinatorClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("download of model version {version} failed: {status}")]
    Call { version: u64, status: tonic::Status },
    #[error("invalid model download: {0}")]
    Invalid(String),
}

/// The parameters and mask of the newest model version this worker holds.
pub struct LocalModel {
    pub version: Option<u64>,
    pub params: Vec<f32>,
    pub mask: Mask,
    pub mask_version: u64,
}

impl LocalModel {
    pub fn new(len: usize) -> Self {
        Self {
            version: None,
            params: vec![0.0; len],
            mask: Mask::all_kept(len),
            mask_version: 0,
        }
    }

    /// Downloads model `version`; returns the bytes received. The local copy changes only
    /// when every shard arrived whole and matched its checksum.
    pub async fn download(
        &mut self,
        client: &mut CoordinatorClient<Channel>,
        worker_id: u64,
        session: &str,
        version: u64,
        layout: &ShardLayout,
    ) -> Result<u64, DownloadError> {
        let request = pb::DownloadRequest {
            worker_id,
            session: session.to_string(),
            model_version: version,
            mask_version: self.mask_version,
        };
        let call_error = |status| DownloadError::Call { version, status };
        let mut stream = client
            .download(request)
            .await
            .map_err(call_error)?
            .into_inner();

        let mut params = vec![0.0f32; layout.total_elems()];
        let mut mask = self.mask.clone();
        let mut mask_version = self.mask_version;
        let mut done = vec![false; layout.num_shards()];
        let mut pending: Option<(pb::ModelChunk, Vec<u8>)> = None;
        let mut bytes = 0u64;

        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(call_error)?;
            bytes += convert::wire_len(&chunk);
            if chunk.model_version != version {
                return Err(DownloadError::Invalid(format!(
                    "chunk of version {} in the download of version {version}",
                    chunk.model_version
                )));
            }
            let shard = layout.shard(chunk.shard_id).ok_or_else(|| {
                DownloadError::Invalid(format!("unknown shard {}", chunk.shard_id))
            })?;
            if chunk.offset == 0 {
                if let Some((previous, _)) = &pending {
                    return Err(DownloadError::Invalid(format!(
                        "shard {} ended early",
                        previous.shard_id
                    )));
                }
                if !chunk.mask.is_empty() {
                    if !mask.unpack_range(shard.range.start, shard.len(), &chunk.mask) {
                        return Err(DownloadError::Invalid(format!(
                            "mask of shard {} is too short",
                            chunk.shard_id
                        )));
                    }
                    mask_version = chunk.mask_version;
                }
                pending = Some((
                    chunk.clone(),
                    Vec::with_capacity(chunk.shard_bytes as usize),
                ));
            }
            let (head, buffer) = pending.as_mut().ok_or_else(|| {
                DownloadError::Invalid(format!("shard {} starts mid-way", chunk.shard_id))
            })?;
            if head.shard_id != chunk.shard_id || chunk.offset != buffer.len() as u64 {
                return Err(DownloadError::Invalid(format!(
                    "chunk of shard {} at offset {} is out of order",
                    chunk.shard_id, chunk.offset
                )));
            }
            buffer.extend_from_slice(&chunk.payload);
            if buffer.len() as u64 >= head.shard_bytes {
                let (head, buffer) = pending.take().expect("pending shard exists");
                if checksum(&buffer) != head.shard_checksum {
                    return Err(DownloadError::Invalid(format!(
                        "checksum mismatch in shard {}",
                        head.shard_id
                    )));
                }
                let values = codec::f32s_from_bytes(&buffer).ok_or_else(|| {
                    DownloadError::Invalid(format!("shard {} is not whole f32s", head.shard_id))
                })?;
                let target = &mut params[shard.range.clone()];
                if head.layout == pb::ValueLayout::Kept as i32 {
                    let kept: Vec<usize> = (0..shard.len())
                        .filter(|&i| mask.get(shard.range.start + i))
                        .collect();
                    if kept.len() != values.len() {
                        return Err(DownloadError::Invalid(format!(
                            "shard {} has {} values for {} kept parameters",
                            head.shard_id,
                            values.len(),
                            kept.len()
                        )));
                    }
                    for (&i, value) in kept.iter().zip(values) {
                        target[i] = value;
                    }
                } else if values.len() == shard.len() {
                    target.copy_from_slice(&values);
                } else {
                    return Err(DownloadError::Invalid(format!(
                        "shard {} has {} values, expected {}",
                        head.shard_id,
                        values.len(),
                        shard.len()
                    )));
                }
                done[head.shard_id as usize] = true;
            }
        }

        if let Some(missing) = done.iter().position(|d| !d) {
            return Err(DownloadError::Invalid(format!(
                "the stream ended before shard {missing} arrived"
            )));
        }
        self.params = params;
        self.mask = mask;
        self.mask_version = mask_version;
        self.version = Some(version);
        Ok(bytes)
    }
}
