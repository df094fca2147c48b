//! `cargo run -p guides --bin llm-wrapper`: see `examples/guides/README.md`.
fn main() -> std::process::ExitCode {
    guides::main_for(guides::llm_wrapper::run)
}
