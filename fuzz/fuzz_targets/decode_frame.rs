#![no_main]
//! Any bytes: decoding never panics or loops, and every decoded frame re-encodes to the same bytes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| kecho_proto::fuzzing::decode_frames(data));
