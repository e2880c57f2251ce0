//! The `nix:` reference parser: no panics; what parses prints canonically and parses the same.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nix_cri::image::reference::fuzz_logic(data));
