//! Fuzz target `prekeys_state`: see `tern_node::crypto::fuzz_support::prekeys_state`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_node::crypto::fuzz_support::prekeys_state(data));
