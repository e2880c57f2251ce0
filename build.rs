//! Generates nix-cri's admin API (proto/nixcri/admin/v1/admin.proto). Needs protoc
//! (Debian's protobuf-compiler; hack/setup installs it).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/nixcri/admin/v1/admin.proto"], &["proto"])?;
    Ok(())
}
