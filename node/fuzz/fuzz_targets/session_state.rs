//! Fuzz target `session_state`: see `tern_node::crypto::fuzz_support::session_state`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_node::crypto::fuzz_support::session_state(data));
