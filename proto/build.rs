//! Compiles our .proto files with protox, a pure-Rust protobuf compiler, so building this crate
//! needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "podmigrate/v1/manifest.proto",
        "podmigrate/v1/runc.proto",
        "criu/core.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["."])?;
    prost_build::Config::new()
        // `podmigrate inspect --json` prints the manifest through serde.
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .type_attribute(".", "#[serde(rename_all = \"camelCase\")]")
        .compile_fds(descriptors)?;
    Ok(())
}
