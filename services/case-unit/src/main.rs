//! The case-unit agency service: serves the refbus gateway and the case-unit RPCs for the
//! agencies of its kind in the directory. Configuration: `--help`.

fn main() -> anyhow::Result<()> {
    refbus_gateway::cli::run(refbus_gateway::AgencyService::CaseUnit)
}
