//! The NAR reader on arbitrary bytes: it must refuse or accept, never panic, loop or allocate
//! beyond its limits; what it accepts must dump back to the same bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nix_cri::nix::nar::fuzz_logic(data));
