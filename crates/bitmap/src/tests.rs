use proptest::prelude::*;

use super::*;

/// The naive model: one bool per granule.
#[derive(Debug, Clone)]
struct Model {
    size: u64,
    granularity: u64,
    bits: Vec<bool>,
}

impl Model {
    fn new(size: u64, granularity: u64) -> Self {
        Self {
            size,
            granularity,
            bits: vec![false; size.div_ceil(granularity) as usize],
        }
    }

    fn touched(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return 0..0;
        }
        (offset / self.granularity) as usize..((end - 1) / self.granularity + 1) as usize
    }

    fn set(&mut self, offset: u64, len: u64, value: bool) {
        for i in self.touched(offset, len) {
            self.bits[i] = value;
        }
    }

    fn get(&self, offset: u64) -> bool {
        offset < self.size && self.bits[(offset / self.granularity) as usize]
    }

    fn next_with(&self, from: u64, value: bool) -> Option<u64> {
        (from..self.size).find(|&b| self.get(b) == value)
    }

    fn count(&self) -> u64 {
        self.bits.iter().filter(|b| **b).count() as u64
    }

    fn count_bytes(&self) -> u64 {
        (0..self.size).filter(|&b| self.get(b)).count() as u64
    }

    fn areas(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(start) = self.next_with(at, true) {
            let end = self.next_with(start, false).unwrap_or(self.size);
            out.push((start, end - start));
            at = end;
        }
        out
    }
}

#[derive(Debug, Clone)]
enum Op {
    Set(u64, u64),
    Reset(u64, u64),
    Fill,
    Clear,
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    let range = (0..size + 64, 0..size / 2 + 2);
    prop_oneof![
        8 => range.clone().prop_map(|(o, l)| Op::Set(o, l)),
        6 => range.prop_map(|(o, l)| Op::Reset(o, l)),
        1 => Just(Op::Fill),
        1 => Just(Op::Clear),
    ]
}

fn scenario() -> impl Strategy<Value = (u64, u64, Vec<Op>, Vec<u64>)> {
    // Sizes up to ~40k granules give three levels; granularities 1..=16 bytes keep the
    // model small while exercising rounding and the unaligned tail.
    (1u64..40_000, 0u32..5).prop_flat_map(|(size, shift)| {
        let granularity = 1u64 << shift;
        (
            Just(size),
            Just(granularity),
            proptest::collection::vec(op(size), 1..24),
            proptest::collection::vec(0..size + 8, 1..16),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn bitmap_agrees_with_naive_model((size, granularity, ops, probes) in scenario()) {
        let mut bitmap = Bitmap::new(size, granularity).unwrap();
        let mut model = Model::new(size, granularity);
        for op in &ops {
            match *op {
                Op::Set(o, l) => { bitmap.set(o, l); model.set(o, l, true); }
                Op::Reset(o, l) => { bitmap.reset(o, l); model.set(o, l, false); }
                Op::Fill => { bitmap.fill(); model.set(0, size, true); }
                Op::Clear => { bitmap.clear(); model.set(0, size, false); }
            }
            prop_assert_eq!(bitmap.count(), model.count());
        }
        prop_assert_eq!(bitmap.count_bytes(), model.count_bytes());
        prop_assert_eq!(bitmap.is_empty(), model.count() == 0);
        for &p in &probes {
            prop_assert_eq!(bitmap.get(p), model.get(p), "get({})", p);
            prop_assert_eq!(bitmap.next_set(p), model.next_with(p, true), "next_set({})", p);
            prop_assert_eq!(bitmap.next_clear(p), model.next_with(p, false), "next_clear({})", p);
            for max_len in [1, granularity, 3 * granularity + 1, u64::MAX] {
                let expected = model.next_with(p, true).map(|start| {
                    let run_end = model.next_with(start, false).unwrap_or(size);
                    (start, (run_end - start).min(max_len))
                });
                prop_assert_eq!(bitmap.next_dirty_area(p, max_len), expected,
                    "next_dirty_area({}, {})", p, max_len);
            }
        }
        let areas: Vec<_> = bitmap.dirty_areas().collect();
        prop_assert_eq!(areas, model.areas());

        let restored = Bitmap::deserialize(&bitmap.serialize()).unwrap();
        prop_assert_eq!(&restored, &bitmap);
    }

    #[test]
    fn merge_is_a_union((size, granularity, ops, _p) in scenario(), other_shift in 0u32..6) {
        let other_granularity = 1u64 << other_shift;
        let mut a = Bitmap::new(size, granularity).unwrap();
        let mut b = Bitmap::new(size, other_granularity).unwrap();
        let mut model = Model::new(size, granularity);
        for (i, op) in ops.iter().enumerate() {
            if let Op::Set(o, l) = *op {
                if i % 2 == 0 { a.set(o, l); } else { b.set(o, l); }
                // `b`'s granules rounded to `a`'s: setting the same bytes in the
                // model rounds outward twice, which matches merging b's runs.
                model.set(o, l, true);
            }
        }
        // Round b's runs as a merge does.
        for (o, l) in b.dirty_areas() {
            model.set(o, l, true);
        }
        a.merge(&b).unwrap();
        prop_assert_eq!(a.count(), model.count());
        prop_assert_eq!(a.dirty_areas().collect::<Vec<_>>(), model.areas());
    }
}

#[test]
fn one_tebibyte_at_64k_costs_about_two_mebibytes() {
    let bitmap = Bitmap::new(1 << 40, 64 << 10).unwrap();
    assert_eq!(bitmap.granules(), 16 << 20);
    let bytes = bitmap.memory_bytes();
    assert!(
        (2 << 20..(2 << 20) + (64 << 10)).contains(&bytes),
        "{bytes} bytes"
    );
}

#[test]
fn search_skips_a_mostly_clean_terabyte() {
    let mut bitmap = Bitmap::new(1 << 40, 64 << 10).unwrap();
    bitmap.set((1 << 40) - 1, 1);
    assert_eq!(bitmap.next_set(0), Some((1 << 40) - (64 << 10)));
    assert_eq!(
        bitmap.next_dirty_area(0, 1 << 20),
        Some(((1 << 40) - (64 << 10), 64 << 10))
    );
    assert_eq!(bitmap.count_bytes(), 64 << 10);
}

#[test]
fn unaligned_tail_counts_only_device_bytes() {
    let mut bitmap = Bitmap::new(4097, 4096).unwrap();
    bitmap.fill();
    assert_eq!(bitmap.count(), 2);
    assert_eq!(bitmap.count_bytes(), 4097);
    assert_eq!(bitmap.next_dirty_area(0, u64::MAX), Some((0, 4097)));
}

#[test]
fn granularity_must_be_a_power_of_two() {
    assert_eq!(
        Bitmap::new(100, 3).unwrap_err(),
        Error::InvalidGranularity(3)
    );
    assert_eq!(
        Bitmap::new(100, 0).unwrap_err(),
        Error::InvalidGranularity(0)
    );
}

#[test]
fn merge_refuses_a_different_device_size() {
    let mut a = Bitmap::new(100, 1).unwrap();
    let b = Bitmap::new(101, 1).unwrap();
    assert_eq!(a.merge(&b).unwrap_err(), Error::SizeMismatch(100, 101));
}

#[test]
fn empty_device_has_nothing_to_find() {
    let mut bitmap = Bitmap::new(0, 512).unwrap();
    bitmap.set(0, 100);
    bitmap.fill();
    assert_eq!(bitmap.count(), 0);
    assert_eq!(bitmap.next_set(0), None);
    assert_eq!(bitmap.next_clear(0), None);
    let restored = Bitmap::deserialize(&bitmap.serialize()).unwrap();
    assert_eq!(restored, bitmap);
}

#[test]
fn serialization_is_stable_little_endian() {
    let mut bitmap = Bitmap::new(130, 1).unwrap();
    bitmap.set(0, 1);
    bitmap.set(65, 2);
    bitmap.set(129, 1);
    let bytes = bitmap.serialize();
    let mut expected = Vec::new();
    expected.extend_from_slice(b"SPBITMAP");
    expected.extend_from_slice(&1u32.to_le_bytes());
    expected.extend_from_slice(&0u32.to_le_bytes());
    expected.extend_from_slice(&130u64.to_le_bytes());
    expected.extend_from_slice(&4u64.to_le_bytes());
    expected.extend_from_slice(&1u64.to_le_bytes());
    expected.extend_from_slice(&0b110u64.to_le_bytes());
    expected.extend_from_slice(&0b10u64.to_le_bytes());
    assert_eq!(bytes, expected);
}

#[test]
fn corrupt_serializations_are_refused_with_a_reason() {
    let mut bitmap = Bitmap::new(100, 1).unwrap();
    bitmap.set(10, 5);
    let good = bitmap.serialize();

    let short = &good[..10];
    assert!(matches!(Bitmap::deserialize(short), Err(Error::Corrupt(m)) if m.contains("shorter")));

    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    assert!(
        matches!(Bitmap::deserialize(&bad_magic), Err(Error::Corrupt(m)) if m.contains("magic"))
    );

    let mut bad_count = good.clone();
    bad_count[24] = 9;
    assert!(
        matches!(Bitmap::deserialize(&bad_count), Err(Error::Corrupt(m)) if m.contains("header says"))
    );

    let mut past_end = good.clone();
    let last = past_end.len() - 1;
    past_end[last] = 0x80;
    assert!(
        matches!(Bitmap::deserialize(&past_end), Err(Error::Corrupt(m)) if m.contains("past the last"))
    );

    let mut truncated = good.clone();
    truncated.pop();
    assert!(
        matches!(Bitmap::deserialize(&truncated), Err(Error::Corrupt(m)) if m.contains("expected"))
    );

    let mut huge_shift = good;
    huge_shift[12] = 200;
    assert!(Bitmap::deserialize(&huge_shift).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Untrusted bytes never panic the loader: they load or are refused.
    #[test]
    fn deserialize_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        let _ = Bitmap::deserialize(&bytes);
    }

    /// A valid serialization with one byte flipped loads only if it is still consistent.
    #[test]
    fn a_flipped_byte_is_refused_or_consistent(size in 1u64..5000, at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut bitmap = Bitmap::new(size, 8).unwrap();
        bitmap.set(size / 3, size / 3 + 1);
        let mut bytes = bitmap.serialize();
        let i = at.index(bytes.len());
        bytes[i] ^= 1 << bit;
        if let Ok(loaded) = Bitmap::deserialize(&bytes) {
            prop_assert_eq!(loaded.count(), loaded.dirty_areas().map(|(_, l)| l.div_ceil(loaded.granularity())).sum::<u64>());
            prop_assert_eq!(Bitmap::deserialize(&loaded.serialize()).unwrap(), loaded);
        }
    }
}

#[test]
fn a_forged_huge_header_is_refused_before_allocating() {
    let mut bytes = Bitmap::new(64, 1).unwrap().serialize();
    bytes[16..24].copy_from_slice(&(1u64 << 39).to_le_bytes());
    let err = Bitmap::deserialize(&bytes).unwrap_err();
    assert!(matches!(err, Error::Corrupt(m) if m.contains("expected")));
}
