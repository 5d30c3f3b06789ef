#![no_main]
//! Any sequence of peer messages, registry answers, lost peers and timeouts: the membership state machine never panics.
libfuzzer_sys::fuzz_target!(|data: &[u8]| kecho_proto::fuzzing::drive_membership(data));
