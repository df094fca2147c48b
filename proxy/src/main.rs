//! `quotastack-proxy`: the sidecar binary.

/// mimalloc, as the control plane: the replica holds a million small allocations (each
/// end user's encoded state, ~80 bytes), which glibc rounds up to 96 with its header,
/// and its arenas keep what the snapshot's persist freed (docs/BENCHMARKS.md, P8).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    proxy::cli::main()
}
