//! The lawyer service: serves `LawyerService` (lawyers' inboxes, meeting
//! requests, complaints, ratings) and the public `LawyerRegistry` for the
//! agency `lawyer-service`, and consumes its broker inbox (registrations and
//! everything addressed to lawyers). Configuration: `--help`.

fn main() -> anyhow::Result<()> {
    refbus_gateway::cli::run(refbus_gateway::AgencyService::Lawyer)
}
