//! Fondation's test kit: the fixture analyzer CLI, the fake Convex deployment, and the helpers
//! the end-to-end tests, the demo and the benchmark use to start and watch real processes; and
//! the benchmark's measurements (`bench`).

pub mod bench;
pub mod fixture_cli;
pub mod support;
