//! Compiles `proto/runnel/v1/*.proto` into tonic/prost code and a descriptor set for reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files: Vec<PathBuf> = [
        "common",
        "collector",
        "broker",
        "analyzer",
        "store",
        "gateway",
    ]
    .iter()
    .map(|name| root.join(format!("runnel/v1/{name}.proto")))
    .collect();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);

    // A vendored protoc, so that a fresh machine needs no system protobuf compiler.
    let mut prost_config = prost_build::Config::new();
    prost_config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("runnel_v1_descriptor.bin"))
        // Messages are encoded into buffers sized up front (see `codec`).
        .codec_path("crate::codec::PresizedCodec")
        // Payloads stay `Bytes` from the wire to the broker's disk: no copies.
        .bytes(".runnel.v1.Event.payload")
        .bytes(".runnel.v1.RecordBatch.records")
        .bytes(".runnel.v1.FetchResponse.stored_batches")
        .bytes(".runnel.v1.RecordChunk.stored_batches")
        .compile_with_config(
            prost_config,
            &files,
            &[root, protoc_bin_vendored::include_path()?],
        )?;
    Ok(())
}
