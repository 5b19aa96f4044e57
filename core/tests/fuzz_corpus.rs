//! Replays the committed cargo-fuzz corpus (`fuzz/corpus/<target>/`) through the same entry
//! points the fuzz targets call, so stable `cargo test` exercises every saved input, and runs
//! the same checks on random inputs: the whole-core driver on random scripts, the decoders on
//! random bytes and NATS protocol fragments.

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

/// Every saved decoder input decodes the same whatever the split, without panicking.
#[test]
fn frame_decoder_corpus_replays() {
    for (path, bytes) in corpus("ipc_frame_decoder") {
        eprintln!("{}", path.display());
        fuzzing::frame_decoder(&bytes);
    }
}

/// Every saved event script keeps the gateway's invariants.
#[test]
fn gateway_events_corpus_replays() {
    for (path, bytes) in corpus("gateway_events") {
        eprintln!("{}", path.display());
        fuzzing::gateway_events(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Random event scripts keep the invariants too (the fuzzer's job, in miniature, on stable).
    #[test]
    fn random_event_scripts_keep_the_invariants(script in proptest::collection::vec(any::<u8>(), 0..400)) {
        fuzzing::gateway_events(&script);
    }

    #[test]
    fn random_bytes_decode_the_same_whatever_the_split(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        fuzzing::frame_decoder(&data);
    }
}

/// Every saved NATS decoder input decodes the same whatever the split, without panicking.
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

    /// Random NATS streams, biased towards protocol fragments, decode the same whatever the
    /// split.
    #[test]
    fn random_nats_streams_decode_the_same_whatever_the_split(
        parts in proptest::collection::vec(fragment(), 0..40),
    ) {
        fuzzing::nats_decoder(&parts.concat());
    }
}

/// Every saved NATS session script keeps the session's invariants.
#[test]
fn nats_session_corpus_replays() {
    for (path, bytes) in corpus("nats_session_events") {
        eprintln!("{}", path.display());
        fuzzing::nats_session_events(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// Random session scripts: at most one outcome per request, none after cancel, bounded
    /// buffer, nothing held at the end.
    #[test]
    fn random_session_scripts_keep_the_invariants(script in proptest::collection::vec(any::<u8>(), 0..600)) {
        fuzzing::nats_session_events(&script);
    }
}
