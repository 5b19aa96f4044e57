//! Replays the committed NATS decoder corpus (`fuzz/corpus/nats_decoder/`) through the entry
//! point the fuzz target calls, so stable `cargo test` exercises every saved input, and runs
//! the same check on random streams biased towards protocol fragments.

use std::path::PathBuf;

use ipc_gateway_core::fuzzing;
use proptest::prelude::*;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "corpus {} is nearly empty", dir.display());
    files
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).expect("read corpus file");
            (p, b)
        })
        .collect()
}

/// Every saved input decodes the same whatever the split, without panicking.
#[test]
fn nats_decoder_corpus_replays() {
    for (path, bytes) in corpus("nats_decoder") {
        eprintln!("{}", path.display());
        fuzzing::nats_decoder(&bytes);
    }
}

fn fragment() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"MSG ".to_vec()),
        Just(b"HMSG ".to_vec()),
        Just(b"INFO {\"port\":1}".to_vec()),
        Just(b"PING".to_vec()),
        Just(b"+OK".to_vec()),
        Just(b"-ERR 'x'".to_vec()),
        Just(b"NATS/1.0".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b" ".to_vec()),
        Just(b"a.b".to_vec()),
        (0u8..40).prop_map(|n| n.to_string().into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..4),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_streams_decode_the_same_whatever_the_split(
        parts in proptest::collection::vec(fragment(), 0..40),
    ) {
        fuzzing::nats_decoder(&parts.concat());
    }
}
