//! Fondation's test kit: the fixture analyzer CLI, the fake Convex deployment, and the helpers
//! the end-to-end tests use to start and watch real processes.

pub mod support;
