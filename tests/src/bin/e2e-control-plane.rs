//! A copy of `quotastack-control-plane` that the end-to-end tests can start and SIGKILL.

fn main() -> anyhow::Result<()> {
    control_plane::cli::main()
}
