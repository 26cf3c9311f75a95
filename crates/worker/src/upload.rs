//! Building and sending a client's compressed update.

use fedcompress_core::{
    ClientId, Mask, Quantization, ShardId, ShardLayout, checksum, codec::encode_update,
};
use fedcompress_proto::{convert, pb};
use pb::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

/// Everything that identifies one upload.
pub struct UploadPlan<'a> {
    pub worker_id: u64,
    pub session: &'a str,
    pub round: u64,
    pub model_version: u64,
    pub client: ClientId,
    pub samples: u64,
    pub shards: &'a [ShardId],
    pub layout: &'a ShardLayout,
    pub mask: &'a Mask,
    pub top_k: f64,
    pub quantization: Quantization,
    pub chunk_bytes: usize,
}

impl UploadPlan<'_> {
    /// Encodes Δ = trained − global for the assigned shards into upload messages: a header,
    /// then each shard's encoded bytes cut into chunks.
    pub fn build(
        &self,
        global: &[f32],
        trained: &[f32],
        mut residual: Option<&mut [f32]>,
    ) -> Vec<pb::UpdateChunk> {
        let mut messages = vec![pb::UpdateChunk {
            part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader {
                worker_id: self.worker_id,
                session: self.session.to_string(),
                round: self.round,
                client_id: self.client,
                num_samples: self.samples,
                model_version: self.model_version,
            })),
        }];
        for &shard_id in self.shards {
            let Some(shard) = self.layout.shard(shard_id) else {
                continue;
            };
            let range = shard.range.clone();
            let delta: Vec<f32> = trained[range.clone()]
                .iter()
                .zip(&global[range.clone()])
                .map(|(t, g)| t - g)
                .collect();
            let start = range.start;
            let mask = self.mask;
            let keep = move |i: usize| mask.get(start + i);
            let shard_residual = residual.as_deref_mut().map(|r| &mut r[range.clone()]);
            let (encoding, bytes) = encode_update(
                &delta,
                Some(&keep),
                self.top_k,
                self.quantization,
                shard_residual,
            );
            push_segments(
                &mut messages,
                shard_id,
                encoding.into(),
                &bytes,
                self.chunk_bytes,
            );
        }
        messages
    }
}

/// Appends the segments of one shard's encoded bytes; an empty shard still sends one segment.
pub fn push_segments(
    messages: &mut Vec<pb::UpdateChunk>,
    shard_id: ShardId,
    encoding: pb::UpdateEncoding,
    bytes: &[u8],
    chunk_bytes: usize,
) {
    let crc = checksum(bytes);
    let mut offset = 0;
    loop {
        let end = (offset + chunk_bytes.max(1)).min(bytes.len());
        messages.push(pb::UpdateChunk {
            part: Some(pb::update_chunk::Part::Segment(pb::ShardSegment {
                shard_id,
                offset: offset as u64,
                payload: bytes::Bytes::copy_from_slice(&bytes[offset..end]),
                encoding: encoding as i32,
                shard_bytes: bytes.len() as u64,
                shard_checksum: crc,
            })),
        });
        offset = end;
        if offset >= bytes.len() {
            break;
        }
    }
}

/// Streams `messages` as one Upload; returns the bytes sent.
pub async fn send(
    client: &mut CoordinatorClient<Channel>,
    messages: Vec<pb::UpdateChunk>,
) -> Result<u64, tonic::Status> {
    let bytes = messages.iter().map(convert::wire_len).sum();
    client.upload(tokio_stream::iter(messages)).await?;
    Ok(bytes)
}
