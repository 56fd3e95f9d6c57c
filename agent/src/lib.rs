//! stub
pub mod clone;
pub mod process;
