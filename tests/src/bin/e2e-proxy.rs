//! A copy of `quotastack-proxy` that the end-to-end tests can start and SIGKILL.

fn main() -> anyhow::Result<()> {
    proxy::cli::main()
}
