//! The protobuf wire patcher and gRPC framing on arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nix_cri::cri::wire::fuzz_logic(data));
