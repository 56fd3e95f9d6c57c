//! stub

pub mod fake_convex;
