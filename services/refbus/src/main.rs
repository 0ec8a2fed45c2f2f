//! `refbus`: run the bus on one machine (`refbus up`) and inspect its
//! configuration. See `refbus --help`.

use clap::Parser;

/// mimalloc instead of glibc's malloc for Rust's allocations (issue 17:
/// BENCHMARKS.md, thirteenth stop).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let Err(e) = refbus::run(refbus::Cli::parse()) {
        eprintln!("refbus: {e:#}");
        std::process::exit(refbus::exit_code(&e));
    }
}
