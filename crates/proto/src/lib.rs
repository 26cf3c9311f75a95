//! The `fedcompress.v1` wire protocol: code generated from `proto/` and helpers around it.

#[allow(clippy::all, missing_docs)]
pub mod generated {
    tonic::include_proto!("fedcompress.v1");
}

pub use generated as pb;

pub mod convert;
