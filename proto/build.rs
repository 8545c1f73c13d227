fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=flywheel");
    let fds = protox::compile(
        ["flywheel/v1/worker.proto", "flywheel/v1/control.proto"],
        ["."],
    )?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("flywheel_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // Messages serialize to JSON for the HTTP API, which returns the same shapes as gRPC.
    tonic_prost_build::configure()
        .codec_path("crate::codec::FlywheelCodec")
        .type_attribute(".flywheel.v1", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}
