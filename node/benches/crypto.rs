//! Crypto benchmarks (placeholder).
fn main() {}
