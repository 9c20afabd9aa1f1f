//! Fuzz target `media_stream`: see `tern_node::crypto::fuzz_support::media_stream`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_node::crypto::fuzz_support::media_stream(data));
