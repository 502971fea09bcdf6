//! Compiles `proto/timber.proto` and `proto/raft.proto` with protox (a protobuf compiler in Rust, so no `protoc` is
//! needed) and generates the messages and the tonic client and server stubs.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not baked in when it is compiled: a build script binary may
    // be reused for a copy of the workspace at another path sharing the target directory.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [root.join("timber.proto"), root.join("raft.proto")];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
