//! `cargo run -p guides --bin api-platform`: see `examples/guides/README.md`.
fn main() -> std::process::ExitCode {
    guides::main_for(guides::api_platform::run)
}
