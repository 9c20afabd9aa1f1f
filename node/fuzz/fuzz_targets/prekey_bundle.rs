//! Fuzz target `prekey_bundle`: see `tern_node::crypto::fuzz_support::prekey_bundle`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_node::crypto::fuzz_support::prekey_bundle(data));
