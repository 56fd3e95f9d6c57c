//! The Fondation agent: takes analysis jobs from the coordinator, runs the analyzer CLI over a
//! clone of the repository, and hands back its progress and output documents.

pub mod collector;
pub mod progress;
