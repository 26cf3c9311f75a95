//! Errors of the coordinator service and their one mapping to gRPC status codes.

use fedcompress_core::{ClientId, CodecError, ShardId};
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid token: the worker must present the run's token (--token)")]
    BadToken,
    #[error("unknown worker {0} or stale session: join again")]
    UnknownSession(u64),
    #[error("invalid join: {0}")]
    InvalidJoin(String),
    #[error("update for round {got}, but the current round is {current}")]
    WrongRound { got: u64, current: String },
    #[error("update built on model version {got}, but round {round} trains version {expected}")]
    WrongModelVersion { got: u64, expected: u64, round: u64 },
    #[error("model version {requested} is not available; the current version is {current}")]
    StaleModelVersion { requested: u64, current: u64 },
    #[error("client {client} is not hosted by worker {worker}")]
    ForeignClient { client: ClientId, worker: u64 },
    #[error("client {client} has no task in round {round}")]
    ClientNotInRound { client: ClientId, round: u64 },
    #[error("client {client} already uploaded its update for round {round}")]
    DuplicateUpdate { client: ClientId, round: u64 },
    #[error("shard {shard} is not assigned to client {client} in round {round}")]
    ShardNotAssigned {
        shard: ShardId,
        client: ClientId,
        round: u64,
    },
    #[error("shard {shard} was sent twice in one upload")]
    DuplicateShard { shard: ShardId },
    #[error("invalid upload: {0}")]
    Malformed(String),
    #[error("bad checksum of shard {shard}: expected {expected:#010x}, computed {computed:#010x}")]
    BadChecksum {
        shard: ShardId,
        expected: u32,
        computed: u32,
    },
    #[error("invalid update of shard {shard}: {source}")]
    BadShard {
        shard: ShardId,
        #[source]
        source: CodecError,
    },
    #[error("upload of client {client} is missing shards {missing:?}")]
    MissingShards {
        client: ClientId,
        missing: Vec<ShardId>,
    },
    #[error("sample count {got} of client {client} differs from the {expected} it joined with")]
    WrongSampleCount {
        client: ClientId,
        got: u64,
        expected: u64,
    },
    #[error("the run is shutting down")]
    ShuttingDown,
}

impl ServiceError {
    /// Short machine-readable reason, logged with every rejection.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadToken => "bad_token",
            Self::UnknownSession(_) => "unknown_session",
            Self::InvalidJoin(_) => "invalid_join",
            Self::WrongRound { .. } => "wrong_round",
            Self::WrongModelVersion { .. } => "wrong_model_version",
            Self::StaleModelVersion { .. } => "stale_model_version",
            Self::ForeignClient { .. } => "foreign_client",
            Self::ClientNotInRound { .. } => "client_not_in_round",
            Self::DuplicateUpdate { .. } => "duplicate",
            Self::ShardNotAssigned { .. } => "shard_not_assigned",
            Self::DuplicateShard { .. } => "duplicate_shard",
            Self::Malformed(_) => "malformed",
            Self::BadChecksum { .. } => "bad_checksum",
            Self::BadShard { source, .. } => match source {
                CodecError::NonFinite(_) => "non_finite",
                CodecError::Length { .. } => "wrong_length",
                _ => "bad_encoding",
            },
            Self::MissingShards { .. } => "missing_shards",
            Self::WrongSampleCount { .. } => "wrong_sample_count",
            Self::ShuttingDown => "shutting_down",
        }
    }

    fn code(&self) -> Code {
        match self {
            Self::BadToken | Self::UnknownSession(_) => Code::Unauthenticated,
            Self::ForeignClient { .. } => Code::PermissionDenied,
            Self::WrongRound { .. }
            | Self::WrongModelVersion { .. }
            | Self::StaleModelVersion { .. }
            | Self::ClientNotInRound { .. } => Code::FailedPrecondition,
            Self::DuplicateUpdate { .. } => Code::AlreadyExists,
            Self::ShuttingDown => Code::Unavailable,
            Self::InvalidJoin(_)
            | Self::ShardNotAssigned { .. }
            | Self::DuplicateShard { .. }
            | Self::Malformed(_)
            | Self::BadChecksum { .. }
            | Self::BadShard { .. }
            | Self::MissingShards { .. }
            | Self::WrongSampleCount { .. } => Code::InvalidArgument,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        Status::new(error.code(), error.to_string())
    }
}
