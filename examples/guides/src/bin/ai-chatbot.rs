//! `cargo run -p guides --bin ai-chatbot`: see `examples/guides/README.md`.
fn main() -> std::process::ExitCode {
    guides::main_for(guides::ai_chatbot::run)
}
