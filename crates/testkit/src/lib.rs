//! Helpers shared by Stillpoint's tests and benchmarks.
//!
//! Everything here is seeded, so a failing test or a benchmark run reproduces exactly
//! from its seed. No dependencies; besides the tests, `stillpoint demo` uses it.
//! [`tools`] runs the external programs the tests take as oracles.

pub mod s3;
pub mod tools;

/// splitmix64: a tiny, fast, seeded generator (not for cryptography).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_stream() {
        let (mut a, mut b) = (Rng(7), Rng(7));
        assert_eq!(a.bytes(64), b.bytes(64));
        assert_ne!(Rng(7).next_u64(), Rng(8).next_u64());
        assert!((0..1000).all(|_| a.below(10) < 10));
        assert_eq!(a.below(0), 0);
    }
}
