//! Compiles `refbus/v1/*.proto` with protox (pure Rust, no system `protoc`)
//! and generates the prost messages and tonic services from the result.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "refbus/v1/envelope.proto",
    "refbus/v1/gateway.proto",
    "refbus/v1/agencies.proto",
    "refbus/v1/tracker.proto",
    "refbus/v1/lawyer.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("refbus_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
