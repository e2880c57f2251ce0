//! The narinfo parser on arbitrary text: no panics; what parses prints and parses the same.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nix_cri::nix::narinfo::fuzz_logic(data));
