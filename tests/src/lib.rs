//! Fondation's test kit: the fixture analyzer CLI, the fake Convex deployment, the benchmark, and
//! the helpers the end-to-end tests and the demo use to start and watch real processes.

pub mod bench;
pub mod fake_convex;
pub mod fixture_cli;
pub mod support;
