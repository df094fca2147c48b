//! A copy of `quotastack-control-plane` that the end-to-end tests can start and SIGKILL,
//! with the same allocator (benches measure its CPU).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    control_plane::cli::main()
}
