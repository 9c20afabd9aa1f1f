//! Fuzz target `media_key`: see `tern_node::crypto::fuzz_support::media_key`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_node::crypto::fuzz_support::media_key(data));
