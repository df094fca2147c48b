//! `quotastack-proxy`: the sidecar binary.

fn main() -> anyhow::Result<()> {
    proxy::cli::main()
}
