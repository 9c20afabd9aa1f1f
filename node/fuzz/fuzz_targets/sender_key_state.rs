//! Fuzz target `sender_key_state`: see `tern_node::crypto::fuzz_support::sender_key_state`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_node::crypto::fuzz_support::sender_key_state(data));
