//! Refcount entries of any width the format allows (1 to 64 bits), packed big-endian
//! in a refcount block: entry `i` of a block with `order` is `1 << order` bits wide.
//! Sub-byte widths fill each byte from its least significant bit, as QEMU does.

/// Reads entry `index` of `block`.
pub fn get(block: &[u8], order: u32, index: u64) -> u64 {
    let bits = 1u64 << order;
    match order {
        0..=2 => {
            let bit = index * bits;
            let byte = block[(bit / 8) as usize];
            (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
        }
        _ => {
            let width = (bits / 8) as usize;
            let at = index as usize * width;
            let mut v = 0u64;
            for &b in &block[at..at + width] {
                v = (v << 8) | u64::from(b);
            }
            v
        }
    }
}

/// Writes `value` (which must fit the width) into entry `index` of `block`.
pub fn set(block: &mut [u8], order: u32, index: u64, value: u64) {
    let bits = 1u64 << order;
    debug_assert!(value <= max(order));
    match order {
        0..=2 => {
            let bit = index * bits;
            let byte = &mut block[(bit / 8) as usize];
            let mask = (((1u64 << bits) - 1) << (bit % 8)) as u8;
            *byte = (*byte & !mask) | (((value << (bit % 8)) as u8) & mask);
        }
        _ => {
            let width = (bits / 8) as usize;
            let at = index as usize * width;
            let bytes = value.to_be_bytes();
            block[at..at + width].copy_from_slice(&bytes[8 - width..]);
        }
    }
}

/// Largest refcount the width can hold.
pub fn max(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u64 << order)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_without_touching_neighbours() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let entries = (512 * 8) >> order;
            for i in 0..entries {
                set(&mut block, order, i, (i * 7 + 3) & max(order));
            }
            for i in 0..entries {
                assert_eq!(
                    get(&block, order, i),
                    (i * 7 + 3) & max(order),
                    "order {order}"
                );
            }
        }
        // 16-bit entries are big-endian, as on disk.
        let mut block = vec![0u8; 8];
        set(&mut block, 4, 1, 0x0102);
        assert_eq!(block[2..4], [1, 2]);
    }
}
