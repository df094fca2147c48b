//! `cargo run -p guides --bin saas-addon`: see `examples/guides/README.md`.
fn main() -> std::process::ExitCode {
    guides::main_for(guides::saas_addon::run)
}
