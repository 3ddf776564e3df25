//! Property tests of the format codecs: whatever is encoded decodes to the same thing,
//! with and without encryption, and any single flipped byte of an encoded object is
//! refused, never decoded to something else.

use proptest::prelude::*;
use repo::ChunkId;
use repo::Compression;
use repo::crypto::Keys;
use repo::format;
use repo::format::PackBuilder;
use repo::format::SnapshotInfo;

/// Chunk contents of the three kinds a disk has: random, repetitive, all zeros.
fn chunk() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 1..3000),
        (any::<u8>(), 1usize..3000).prop_map(|(b, n)| std::iter::repeat_n(b, n).collect()),
        (1usize..3000).prop_map(|n| vec![0; n]),
        (".{1,40}", 1usize..80).prop_map(|(s, n)| s.repeat(n).into_bytes()),
    ]
}

fn keys_for(encrypted: bool) -> Option<Keys> {
    encrypted.then(Keys::generate)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn blobs_round_trip_and_a_flipped_byte_is_refused(
        data in chunk(),
        zstd in any::<bool>(),
        encrypted in any::<bool>(),
        flip in any::<prop::sample::Index>(),
    ) {
        let keys = keys_for(encrypted);
        let id = ChunkId::keyed(keys.as_ref(), &data);
        let (stored, codec) =
            format::encode_blob(&data, if zstd { Compression::Zstd } else { Compression::None });
        prop_assert!(stored.len() <= data.len());
        let stored = match &keys {
            Some(k) => k.seal(&id.0, &stored),
            None => stored,
        };
        let blob = format::BlobRef { offset: 5, stored_len: stored.len() as u32, raw_len: data.len() as u32, codec };
        prop_assert_eq!(&format::decode_blob("t", keys.as_ref(), &id, &blob, &stored).unwrap(), &data);
        let mut out = vec![0; data.len()];
        let mut copy = stored.clone();
        format::decode_blob_into("t", keys.as_ref(), &id, &blob, &mut copy, &mut out).unwrap();
        prop_assert_eq!(&out, &data);
        if id != ChunkId::ZERO {
            let mut bad = stored.clone();
            let at = flip.index(bad.len());
            bad[at] ^= 0x5a;
            prop_assert!(format::decode_blob("t", keys.as_ref(), &id, &blob, &bad).is_err());
            let mut out = vec![0; data.len()];
            prop_assert!(format::decode_blob_into("t", keys.as_ref(), &id, &blob, &mut bad, &mut out).is_err());
        }
    }

    #[test]
    fn a_packs_own_index_matches_its_index_object(
        chunks in proptest::collection::vec(chunk(), 1..12),
        encrypted in any::<bool>(),
        flip in any::<prop::sample::Index>(),
    ) {
        let keys = keys_for(encrypted);
        let mut pack = PackBuilder::new();
        for data in &chunks {
            let id = ChunkId::keyed(keys.as_ref(), data);
            let (stored, codec) = format::encode_blob(data, Compression::Zstd);
            let stored = match &keys { Some(k) => k.seal(&id.0, &stored), None => stored };
            pack.add(id, &stored, data.len() as u32, codec);
        }
        let finished = pack.finish(keys.as_ref());
        let (tail, blobs_end) = format::pack_tail("p", &finished.bytes, keys.as_ref()).unwrap();
        let own = format::decode_index("p", &tail, Some(blobs_end)).unwrap();
        let object = format::open_index_object("i", &finished.index, keys.as_ref()).unwrap();
        let filed = format::decode_index("i", &object, None).unwrap();
        prop_assert_eq!(&own, &filed);
        prop_assert_eq!(&own, &finished.entries);
        for ((id, blob), data) in own.iter().zip(&chunks) {
            let at = blob.offset as usize;
            let stored = &finished.bytes[at..at + blob.stored_len as usize];
            prop_assert_eq!(&format::decode_blob("p", keys.as_ref(), id, blob, stored).unwrap(), data);
        }
        // A flipped byte in the index object is refused.
        let mut bad = finished.index.clone();
        let at = flip.index(bad.len());
        bad[at] ^= 0x01;
        let parsed = format::open_index_object("i", &bad, keys.as_ref())
            .and_then(|b| format::decode_index("i", &b, None));
        prop_assert!(parsed.is_err());
    }

    #[test]
    fn manifests_round_trip_and_a_flipped_byte_is_refused(
        disk in "[a-z0-9-]{1,20}",
        ids in proptest::collection::vec(any::<[u8; 32]>(), 1..40),
        size_tail in 1u64..65536,
        parent in proptest::option::of("[0-9a-f]{16}"),
        encrypted in any::<bool>(),
        flip in any::<prop::sample::Index>(),
    ) {
        let keys = keys_for(encrypted);
        let chunks: Vec<ChunkId> = ids.into_iter().map(ChunkId).collect();
        let info = SnapshotInfo {
            bitmap: None,
            id: String::new(),
            disk,
            time_ns: 1_700_000_000_000_000_000,
            size: (chunks.len() as u64 - 1) * 65536 + size_tail,
            chunk_size: 65536,
            parent,
            stored: 12345,
            tool: "stillpoint test".into(),
        };
        let (id, bytes) = format::encode_manifest(&info, &chunks);
        let sealed = format::seal_manifest(bytes, keys.as_ref());
        let (back, back_chunks) = format::open_manifest("m", &id, &sealed, keys.as_ref()).unwrap();
        prop_assert_eq!(&back.disk, &info.disk);
        prop_assert_eq!(back.size, info.size);
        prop_assert_eq!(&back.parent, &info.parent);
        prop_assert_eq!(&back_chunks, &chunks);
        let mut bad = sealed.clone();
        let at = flip.index(bad.len());
        bad[at] ^= 0x10;
        prop_assert!(format::open_manifest("m", &id, &bad, keys.as_ref()).is_err());
    }
}
