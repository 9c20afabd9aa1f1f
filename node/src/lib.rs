//! placeholder

pub mod crypto;
