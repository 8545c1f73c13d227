//! Duplicate removal and decontamination of prompts.
//!
//! - Exact duplicates: the same text after normalisation (lower case, runs of whitespace and
//!   punctuation collapsed).
//! - Near duplicates: MinHash signatures (64 hash functions) over character `shingle`-grams of
//!   the normalised text, banded for locality-sensitive hashing (16 bands of 4 rows); a
//!   candidate pair is a duplicate when the signatures' agreement (an estimate of the Jaccard
//!   similarity) is at least the threshold. The first occurrence is kept.
//! - Earlier rounds: prompts from earlier rounds are indexed first, so a prompt seen before is
//!   removed.
//! - Decontamination: a prompt that shares a word `n`-gram with an evaluation prompt is removed
//!   (an evaluation prompt shorter than `n` words counts as one n-gram of its own length).
//!
//! Signatures are computed on every core; the keep-first pass is sequential.

use std::collections::{HashMap, HashSet};

const PERMUTATIONS: usize = 64;
const BANDS: usize = 16;
const ROWS: usize = PERMUTATIONS / BANDS;

/// Why a prompt was removed, or that it was kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Kept,
    /// The same normalised text as an earlier prompt of this stage.
    Exact,
    /// A near duplicate of the prompt at this index (of the stage's list).
    Near(usize),
    /// The same as, or a near duplicate of, a prompt of an earlier round.
    EarlierRound,
    /// Shares an n-gram with an evaluation prompt.
    Contaminated,
}

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Remove exact and near duplicates (false: only decontaminate).
    pub duplicates: bool,
    /// Least estimated Jaccard similarity of a near duplicate (0 < t ≤ 1).
    pub threshold: f64,
    /// Characters per shingle.
    pub shingle: usize,
    /// Words per decontamination n-gram.
    pub ngram: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            duplicates: true,
            threshold: 0.8,
            shingle: 5,
            ngram: 8,
        }
    }
}

/// Lower case; every run of non-alphanumeric characters becomes one space.
pub fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut gap = false;
    for c in text.chars() {
        if c.is_alphanumeric() {
            if gap && !out.is_empty() {
                out.push(' ');
            }
            gap = false;
            out.extend(c.to_lowercase());
        } else {
            gap = true;
        }
    }
    out
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// The hash functions `a * x + b` (odd `a`), the same in every run.
fn coefficients() -> ([u32; PERMUTATIONS], [u32; PERMUTATIONS]) {
    let mut rng = super::Rng::new(0x5eed_d3d0);
    let mut a = [0u32; PERMUTATIONS];
    let mut b = [0u32; PERMUTATIONS];
    for i in 0..PERMUTATIONS {
        a[i] = (rng.next_u64() as u32) | 1;
        b[i] = rng.next_u64() as u32;
    }
    (a, b)
}

type Signature = [u32; PERMUTATIONS];

fn signature(normalised: &str, shingle: usize, a: &Signature, b: &Signature) -> Signature {
    let mut sig = [u32::MAX; PERMUTATIONS];
    let bytes = normalised.as_bytes();
    let width = shingle.max(1);
    let mut update = |x: u32| {
        for i in 0..PERMUTATIONS {
            sig[i] = sig[i].min(a[i].wrapping_mul(x).wrapping_add(b[i]));
        }
    };
    if bytes.len() <= width {
        update(fold(fnv(bytes)));
    } else {
        for w in bytes.windows(width) {
            update(fold(fnv(w)));
        }
    }
    sig
}

fn fold(h: u64) -> u32 {
    (h ^ (h >> 32)) as u32
}

/// Whether two signatures agree on at least `threshold` of their values; stops at the first
/// mismatch too many (most candidates are not duplicates).
fn similar(x: &Signature, y: &Signature, threshold: f64) -> bool {
    let allowed = ((1.0 - threshold) * PERMUTATIONS as f64).floor() as usize;
    let mut mismatches = 0;
    for (a, b) in x.iter().zip(y) {
        if a != b {
            mismatches += 1;
            if mismatches > allowed {
                return false;
            }
        }
    }
    true
}

/// Normalised texts and signatures of `texts`, computed on every core.
fn signatures(texts: &[&str], shingle: usize) -> Vec<(String, Signature)> {
    let (a, b) = coefficients();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = texts.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = texts
            .chunks(chunk)
            .map(|part| {
                s.spawn(|| {
                    part.iter()
                        .map(|t| {
                            let n = normalise(t);
                            let sig = signature(&n, shingle, &a, &b);
                            (n, sig)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("signature thread"))
            .collect()
    })
}

fn band_key(band: usize, sig: &Signature) -> u64 {
    let mut h: u64 = band as u64;
    for v in &sig[band * ROWS..(band + 1) * ROWS] {
        h = (h ^ u64::from(*v))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
    h
}

/// The fate of each of `texts`, in order: removed as an exact or near duplicate (of an earlier
/// text or of one of `earlier`), removed as sharing an n-gram with one of `eval`, or kept.
pub fn dedup(texts: &[&str], earlier: &[&str], eval: &[&str], s: Settings) -> Vec<Fate> {
    let contamination = Contamination::new(eval, s.ngram);
    let earlier_sigs = signatures(earlier, s.shingle);
    let sigs = signatures(texts, s.shingle);
    // Index entries: (is earlier, index).
    let mut exact: HashMap<&str, Option<usize>> = HashMap::new();
    let mut buckets: Vec<HashMap<u64, Vec<(bool, usize)>>> = vec![HashMap::new(); BANDS];
    for (i, (n, sig)) in earlier_sigs.iter().enumerate() {
        exact.entry(n.as_str()).or_insert(None);
        for (band, bucket) in buckets.iter_mut().enumerate() {
            bucket
                .entry(band_key(band, sig))
                .or_default()
                .push((true, i));
        }
    }
    let mut fates = Vec::with_capacity(texts.len());
    for (i, (n, sig)) in sigs.iter().enumerate() {
        if contamination.hits(n) {
            fates.push(Fate::Contaminated);
            continue;
        }
        if !s.duplicates {
            fates.push(Fate::Kept);
            continue;
        }
        if let Some(first) = exact.get(n.as_str()) {
            fates.push(match first {
                None => Fate::EarlierRound,
                Some(_) => Fate::Exact,
            });
            continue;
        }
        let keys: Vec<u64> = (0..BANDS).map(|band| band_key(band, sig)).collect();
        let similar = keys.iter().enumerate().find_map(|(band, k)| {
            buckets[band].get(k)?.iter().copied().find(|(old, j)| {
                let other = if *old {
                    &earlier_sigs[*j].1
                } else {
                    &sigs[*j].1
                };
                similar(sig, other, s.threshold)
            })
        });
        match similar {
            Some((true, _)) => fates.push(Fate::EarlierRound),
            Some((false, j)) => fates.push(Fate::Near(j)),
            None => {
                exact.insert(n.as_str(), Some(i));
                for (band, k) in keys.into_iter().enumerate() {
                    buckets[band].entry(k).or_default().push((false, i));
                }
                fates.push(Fate::Kept);
            }
        }
    }
    fates
}

/// Word n-grams of the evaluation prompts.
struct Contamination {
    grams: HashSet<u64>,
    /// The n-gram lengths to look for: `n`, and the lengths of shorter evaluation prompts.
    lengths: Vec<usize>,
}

impl Contamination {
    fn new(eval: &[&str], n: usize) -> Self {
        let n = n.max(1);
        let mut grams = HashSet::new();
        let mut lengths = HashSet::new();
        for e in eval {
            let norm = normalise(e);
            let words: Vec<&str> = norm.split(' ').filter(|w| !w.is_empty()).collect();
            if words.is_empty() {
                continue;
            }
            let len = words.len().min(n);
            lengths.insert(len);
            for w in words.windows(len) {
                grams.insert(gram_hash(w));
            }
        }
        let mut lengths: Vec<usize> = lengths.into_iter().collect();
        lengths.sort_unstable();
        Self { grams, lengths }
    }

    fn hits(&self, normalised: &str) -> bool {
        if self.grams.is_empty() {
            return false;
        }
        let words: Vec<&str> = normalised.split(' ').filter(|w| !w.is_empty()).collect();
        self.lengths.iter().any(|len| {
            words
                .windows(*len)
                .any(|w| self.grams.contains(&gram_hash(w)))
        })
    }
}

fn gram_hash(words: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in words {
        for b in w.as_bytes().iter().chain(b" ") {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
    h
}

/// How many of each fate: `(kept, exact, near, earlier_round, contaminated)`.
pub fn tally(fates: &[Fate]) -> (usize, usize, usize, usize, usize) {
    let mut t = (0, 0, 0, 0, 0);
    for f in fates {
        match f {
            Fate::Kept => t.0 += 1,
            Fate::Exact => t.1 += 1,
            Fate::Near(_) => t.2 += 1,
            Fate::EarlierRound => t.3 += 1,
            Fate::Contaminated => t.4 += 1,
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdg::Rng;

    fn sentence(rng: &mut Rng, words: usize) -> String {
        const VOCAB: [&str; 40] = [
            "river",
            "market",
            "energy",
            "garden",
            "history",
            "signal",
            "window",
            "engine",
            "season",
            "voice",
            "letter",
            "journey",
            "explain",
            "describe",
            "compare",
            "write",
            "summarise",
            "list",
            "why",
            "how",
            "what",
            "the",
            "a",
            "of",
            "in",
            "for",
            "with",
            "modern",
            "ancient",
            "small",
            "large",
            "city",
            "policy",
            "music",
            "science",
            "poem",
            "essay",
            "email",
            "recipe",
            "budget",
        ];
        (0..words)
            .map(|_| VOCAB[rng.below(VOCAB.len())])
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Planted exact and near duplicates among distinct prompts: precision and recall of the
    /// removal, printed (run with `--nocapture`).
    #[test]
    fn finds_planted_duplicates_and_keeps_distinct_prompts() {
        let mut rng = Rng::new(42);
        let originals: Vec<String> = (0..2000).map(|_| sentence(&mut rng, 40)).collect();
        let mut texts: Vec<String> = originals.clone();
        let mut planted = HashSet::new();
        for original in &originals[..200] {
            // Exact after normalisation: case and punctuation changed.
            planted.insert(texts.len());
            texts.push(format!("{}!", original.to_uppercase()));
        }
        for original in &originals[200..400] {
            // Near: one word of 40 replaced.
            let mut words: Vec<&str> = original.split(' ').collect();
            words[20] = "zebra";
            planted.insert(texts.len());
            texts.push(words.join(" "));
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let fates = dedup(&refs, &[], &[], Settings::default());
        let removed: HashSet<usize> = (0..texts.len())
            .filter(|i| fates[*i] != Fate::Kept)
            .collect();
        let true_pos = removed.intersection(&planted).count() as f64;
        let precision = true_pos / removed.len() as f64;
        let recall = true_pos / planted.len() as f64;
        println!(
            "planted {} duplicates: precision {precision:.3}, recall {recall:.3}",
            planted.len()
        );
        assert!(precision >= 0.99, "precision {precision}");
        assert!(recall >= 0.95, "recall {recall}");
        assert!(fates[2000..2200].iter().all(|f| *f == Fate::Exact));
    }

    #[test]
    fn earlier_rounds_and_evaluation_prompts_are_removed() {
        let earlier = ["Write a poem about the river in spring."];
        let eval = [
            "What is the capital of France and why did it become the capital?",
            "Add 3 and 4",
        ];
        let texts = [
            "write a poem about the river in spring",
            "Explain photosynthesis to a child.",
            "Question: what is the capital of France and why did it become the capital? Answer briefly.",
            "Please add 3 and 4 for me.",
            "Explain photosynthesis to a child!",
        ];
        let fates = dedup(&texts, &earlier, &eval, Settings::default());
        assert_eq!(
            fates,
            vec![
                Fate::EarlierRound,
                Fate::Kept,
                Fate::Contaminated,
                Fate::Contaminated,
                Fate::Exact
            ]
        );
    }
}
