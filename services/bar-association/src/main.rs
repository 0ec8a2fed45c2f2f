//! The bar-association agency service: serves the refbus gateway and the bar-association RPCs for the
//! agencies of its kind in the directory. Configuration: `--help`.

fn main() -> anyhow::Result<()> {
    refbus_gateway::cli::run(refbus_gateway::AgencyService::BarAssociation)
}
