//! Generates the gRPC code from proto/ with protox, so a fresh machine needs no `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script compiled for another checkout may be reused.
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let file = proto_root.join("fedcompress/v1/fedcompress.proto");
    println!("cargo:rerun-if-changed={}", file.display());

    let descriptors = protox::compile([&file], [&proto_root])?;
    tonic_prost_build::configure()
        .bytes(".fedcompress.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
