//! Fuzz target `sender_key_distribution`: see `tern_node::crypto::fuzz_support::sender_key_distribution`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_node::crypto::fuzz_support::sender_key_distribution(data));
