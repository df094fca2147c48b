//! `quotastack-control-plane`: the command line lives in the library (`cli.rs`).

/// mimalloc: a control plane allocates and frees many short-lived buffers per request
/// (JSON bodies, rows); glibc's allocator spent ~15% of P4's time on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    control_plane::cli::main()
}
