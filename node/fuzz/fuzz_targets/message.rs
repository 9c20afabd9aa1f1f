//! Fuzz target `message`: see `tern_node::crypto::fuzz_support::message`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_node::crypto::fuzz_support::message(data));
