//! A copy of `quotastack-proxy` that the end-to-end tests can start and SIGKILL.

/// The shipped binary's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    proxy::cli::main()
}
