//! Synthetic data generation as in the Nemotron-4 recipe: LLM-driven prompt pipelines
//! (`pipelines`), IFEval's verifiable instructions with their checkers (`instructions`),
//! tolerant parsing of an LLM's list answers (`lists`), seed prompt files (`seeds`), and exact
//! and near-duplicate removal and decontamination (`dedup`).

pub mod dedup;
pub mod instructions;
pub mod lists;
pub mod pipelines;
pub mod seeds;

/// A small seeded generator (SplitMix64): the same seed gives the same prompts, instructions
/// and splits on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A stable 64-bit hash (FNV-1a) of text, for pool splits that must not change between runs.
pub fn stable_hash(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}
