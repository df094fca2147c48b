//! `cargo run -p guides --bin dev-tool`: see `examples/guides/README.md`.
fn main() -> std::process::ExitCode {
    guides::main_for(guides::dev_tool::run)
}
