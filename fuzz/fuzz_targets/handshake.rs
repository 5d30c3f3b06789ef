#![no_main]
//! Any first messages: both sides of the handshake decide exactly as the protocol says and never panic.
libfuzzer_sys::fuzz_target!(|data: &[u8]| kecho_proto::fuzzing::handshake(data));
