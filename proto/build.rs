//! Compiles the protos with protox (pure Rust, no system `protoc`) and writes the file descriptor
//! set that server reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "fondation/v1/agent_gateway.proto",
        "fondation/v1/admin.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["."])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("fondation_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    // Assignment carries a clone credential: its Debug is written by hand, redacting it. The
    // services use the codec of `src/codec.rs` (small per-call buffers).
    tonic_prost_build::configure()
        .skip_debug([".fondation.v1.Assignment"])
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(fds)?;
    Ok(())
}
