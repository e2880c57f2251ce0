//! The relay's HTTP/2 frame parser and HPACK decoder on arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nix_cri::cri::hpack::fuzz_logic(data));
