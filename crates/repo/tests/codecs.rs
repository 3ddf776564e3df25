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
        let blob = format::BlobRef { offset: 5, stored_len: stored.len() as u32, raw_len: data.len() as u32, codec, base: None };
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

/// A base chunk, and runs (offset, length; sorted, apart) inside it, from seeds.
fn base_and_runs() -> impl Strategy<Value = (Vec<u8>, Vec<(u32, u32)>)> {
    (
        chunk(),
        proptest::collection::vec((any::<u16>(), 1u16..400), 1..6),
    )
        .prop_map(|(base, cuts)| {
            let len = base.len() as u32;
            let mut runs: Vec<(u32, u32)> = Vec::new();
            let mut at = 0u32;
            for (gap, n) in cuts {
                let start = at + u32::from(gap) % 300;
                let end = (start + u32::from(n)).min(len);
                if start >= end {
                    break;
                }
                runs.push((start, end - start));
                at = end + 1;
            }
            (base, runs)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A delta over its base gives the changed chunk back, in a pack and its index;
    /// a flipped byte, another base, or no base is refused, never another chunk.
    #[test]
    fn deltas_round_trip_and_refuse_a_wrong_base_or_a_flipped_byte(
        (base, runs) in base_and_runs(),
        fill in any::<u8>(),
        zstd in any::<bool>(),
        encrypted in any::<bool>(),
        flip in any::<prop::sample::Index>(),
    ) {
        prop_assume!(!runs.is_empty());
        let keys = keys_for(encrypted);
        let mut data = base.clone();
        for (n, &(at, len)) in runs.iter().enumerate() {
            for (i, b) in data[at as usize..(at + len) as usize].iter_mut().enumerate() {
                *b = fill.wrapping_add((i + n) as u8) | 1;
            }
        }
        let id = ChunkId::keyed(keys.as_ref(), &data);
        let base_id = ChunkId::keyed(keys.as_ref(), &base);
        prop_assume!(id != base_id && base_id != ChunkId::ZERO);
        let compression = if zstd { Compression::Zstd } else { Compression::None };
        let (stored, codec) = format::encode_delta(&data, &runs, compression).unwrap();
        let stored = match &keys { Some(k) => k.seal(&id.0, &stored), None => stored };
        let mut pack = PackBuilder::new();
        pack.add_blob(id, &stored, data.len() as u32, codec, Some(base_id));
        let finished = pack.finish(keys.as_ref());
        let object = format::open_index_object("i", &finished.index, keys.as_ref()).unwrap();
        let filed = format::decode_index("i", &object, None).unwrap();
        prop_assert_eq!(&filed, &finished.entries);
        let blob = filed[0].1;
        prop_assert_eq!(blob.base, Some(base_id));
        let at = blob.offset as usize;
        let in_pack = &finished.bytes[at..at + blob.stored_len as usize];
        let decode = |stored: &[u8], base: Option<&[u8]>| {
            let mut stored = stored.to_vec();
            let mut out = vec![0; data.len()];
            format::decode_delta_into("p", keys.as_ref(), &id, &blob, &mut stored, base, &mut out)
                .map(|()| out)
        };
        prop_assert_eq!(&decode(in_pack, Some(&base)).unwrap(), &data);
        prop_assert!(decode(in_pack, None).is_err(), "a delta read without its base");
        let mut other = base.clone();
        let spot = runs[0].0 as usize + runs[0].1 as usize;
        if spot < other.len() {
            other[spot] ^= 0x80;
            prop_assert!(decode(in_pack, Some(&other)).is_err(), "another base");
        }
        let mut bad = in_pack.to_vec();
        let at = flip.index(bad.len());
        bad[at] ^= 0x5a;
        prop_assert!(decode(&bad, Some(&base)).is_err());
    }
}

#[test]
fn a_delta_takes_only_a_valid_set_of_runs() {
    let data = vec![7u8; 1000];
    for runs in [
        vec![],
        vec![(0, 0)],
        vec![(10, 5), (12, 5)],
        vec![(10, 5), (15, 5)],
        vec![(20, 5), (10, 5)],
        vec![(990, 11)],
    ] {
        assert!(
            format::encode_delta(&data, &runs, Compression::None).is_none(),
            "{runs:?}"
        );
    }
    let too_many: Vec<(u32, u32)> = (0..=format::MAX_DELTA_RUNS as u32)
        .map(|n| (n * 2, 1))
        .collect();
    assert!(format::encode_delta(&data, &too_many, Compression::None).is_none());
    assert!(format::encode_delta(&data, &[(10, 5), (16, 5)], Compression::None).is_some());
}
