//! The Fondation coordinator: the only process that talks to the job source (Convex or the
//! embedded store). It claims jobs, keeps their leases, streams assignments to agents over gRPC,
//! turns agent progress into job-source updates and completes or retries jobs.

pub mod job_source;
