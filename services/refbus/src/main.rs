//! `refbus`: run the bus on one machine (`refbus up`) and inspect its
//! configuration. See `refbus --help`.

use clap::Parser;

fn main() {
    if let Err(e) = refbus::run(refbus::Cli::parse()) {
        eprintln!("refbus: {e:#}");
        std::process::exit(refbus::exit_code(&e));
    }
}
