//! Fuzz target `group_message`: see `tern_node::crypto::fuzz_support::group_message`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_node::crypto::fuzz_support::group_message(data));
