//! Fondation's test kit: the fixture analyzer CLI and the helpers the integration tests and the
//! demo share.

pub mod fixture_cli;
