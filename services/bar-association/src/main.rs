//! The bar-association agency service: serves the refbus gateway and the bar-association RPCs for the
//! agencies of its kind in the directory. Configuration: `--help`.

/// mimalloc instead of glibc's malloc for Rust's allocations (issue 17:
/// BENCHMARKS.md, thirteenth stop).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    refbus_gateway::cli::run(refbus_gateway::AgencyService::BarAssociation)
}
