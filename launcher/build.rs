//! Sets what `--version` prints (revision and target; `buildinfo/version_env.rs`).
include!("../buildinfo/version_env.rs");

fn main() {
    emit_version_env();
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../buildinfo/version_env.rs");
}
