//! Replays the fuzzers' saved corpora, so that what fuzzing found stays fixed. The corpora live in `fuzz/corpus/`.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} missing: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).expect("corpus file")).collect()
}

#[test]
fn decode_frame_corpus() {
    let inputs = corpus("decode_frame");
    assert!(inputs.len() >= 20, "corpus too small: {}", inputs.len());
    for input in &inputs {
        kecho_proto::fuzzing::decode_frames(input);
    }
}

#[test]
fn membership_corpus() {
    let inputs = corpus("membership");
    assert!(inputs.len() >= 20, "corpus too small: {}", inputs.len());
    for input in &inputs {
        kecho_proto::fuzzing::drive_membership(input);
    }
}

#[test]
fn handshake_corpus() {
    let inputs = corpus("handshake");
    assert!(inputs.len() >= 20, "corpus too small: {}", inputs.len());
    for input in &inputs {
        kecho_proto::fuzzing::handshake(input);
    }
}
