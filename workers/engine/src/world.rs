//! The task world: short instructions whose answers a program can check.
//!
//! Topics → subtopics → prompts, with difficulty levels: arithmetic (add, sub, mul), string
//! transforms (reverse, sort, upper, count), each optionally under a format constraint ("in
//! brackets", or "in quotes": IFEval's `startend:quotation`, phrased to fit a small context). A
//! prompt's text fully determines its answer, so [`verify`] needs only the text.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

pub const TOPICS: &[(&str, &[&str])] = &[
    ("arithmetic", &["add", "sub", "mul"]),
    ("strings", &["reverse", "sort", "upper", "count"]),
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prompt {
    pub id: String,
    pub prompt: String,
    pub topic: String,
    pub subtopic: String,
    pub difficulty: u32,
}

/// The answer a prompt asks for, or `None` when the text is not a task of this world.
pub fn answer(prompt: &str) -> Option<String> {
    let (body, format) = Format::of(prompt);
    let mut words = body.split(' ');
    let op = words.next()?;
    let args: Vec<&str> = words.collect();
    let core = match (op, args.as_slice()) {
        ("add", [a, b]) => (a.parse::<i64>().ok()? + b.parse::<i64>().ok()?).to_string(),
        ("sub", [a, b]) => (a.parse::<i64>().ok()? - b.parse::<i64>().ok()?).to_string(),
        ("mul", [a, b]) => (a.parse::<i64>().ok()? * b.parse::<i64>().ok()?).to_string(),
        ("reverse", [s]) => s.chars().rev().collect(),
        ("sort", [s]) => {
            let mut c: Vec<char> = s.chars().collect();
            c.sort_unstable();
            c.into_iter().collect()
        }
        ("upper", [s]) => s.to_uppercase(),
        ("count", [c, s]) if c.len() == 1 => s.matches(c).count().to_string(),
        _ => return None,
    };
    Some(match format {
        Format::Plain => core,
        Format::Brackets => format!("[{core}]"),
        Format::Quotes => format!("\"{core}\""),
    })
}

/// The format constraint a prompt ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Plain,
    /// " in brackets": the answer in `[...]`.
    Brackets,
    /// " in quotes": the whole answer wrapped in double quotes (IFEval's `startend:quotation`).
    Quotes,
}

impl Format {
    const SUFFIXES: [(Format, &'static str); 2] = [
        (Format::Brackets, " in brackets"),
        (Format::Quotes, " in quotes"),
    ];

    /// The prompt's body and its format.
    pub fn of(prompt: &str) -> (&str, Format) {
        Self::SUFFIXES
            .iter()
            .find_map(|(f, s)| prompt.strip_suffix(s).map(|b| (b, *f)))
            .unwrap_or((prompt, Format::Plain))
    }

    /// What a prompt ends with to ask for this format (empty for plain).
    pub fn suffix(self) -> &'static str {
        Self::SUFFIXES
            .iter()
            .find(|(f, _)| *f == self)
            .map_or("", |(_, s)| s)
    }
}

/// Whether `response` answers `prompt` correctly. Leading and trailing spaces are ignored.
pub fn verify(prompt: &str, response: &str) -> bool {
    answer(prompt).is_some_and(|a| a == response.trim())
}

/// Difficulty 1..=3 of a prompt (by operand size), 0 for text outside the task world.
pub fn difficulty(prompt: &str) -> u32 {
    let longest = prompt.split(' ').skip(1).map(str::len).max().unwrap_or(0);
    match longest {
        0 => 0,
        1..=2 => 1,
        3..=4 => 2,
        _ => 3,
    }
}

fn word(rng: &mut Rng, len: usize) -> String {
    (0..len)
        .map(|_| (b'a' + rng.below(8) as u8) as char)
        .collect()
}

/// One prompt of `subtopic` at `difficulty` (1..=3).
pub fn make(rng: &mut Rng, subtopic: &str, difficulty: u32, format: Format) -> String {
    let max = [10, 100, 1000][(difficulty.clamp(1, 3) - 1) as usize];
    let len = 1 + difficulty as usize + rng.below(2) as usize;
    let body = match subtopic {
        "add" => format!("add {} {}", rng.below(max), rng.below(max)),
        "sub" => format!("sub {} {}", rng.below(max), rng.below(max)),
        "mul" => format!("mul {} {}", rng.below(max.min(100) / 2 + 2), rng.below(10)),
        "reverse" => format!("reverse {}", word(rng, len)),
        "sort" => format!("sort {}", word(rng, len)),
        "upper" => format!("upper {}", word(rng, len)),
        _ => {
            let w = word(rng, len + 2);
            let c = w
                .chars()
                .nth(rng.below(w.len() as u64) as usize)
                .unwrap_or('a');
            format!("count {c} {w}")
        }
    };
    format!("{body}{}", format.suffix())
}

/// Which part of the prompt space: every prompt text belongs to exactly one, by a hash of the
/// text, so training prompts can never leak into held-out evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    HeldOut,
    Any,
}

impl Split {
    pub fn contains(self, text: &str) -> bool {
        // FNV-1a: stable across platforms and releases.
        let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        match self {
            Split::Any => true,
            Split::HeldOut => h % 5 == 0,
            Split::Train => h % 5 != 0,
        }
    }
}

/// Settings of the prompt generator.
#[derive(Debug, Clone)]
pub struct Mix {
    pub subtopics: Vec<String>,
    pub max_difficulty: u32,
    /// Fraction of prompts with the bracket format constraint.
    pub brackets: f64,
    /// Fraction of prompts asking for the answer in quotes.
    pub quotes: f64,
    pub split: Split,
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            subtopics: TOPICS
                .iter()
                .flat_map(|(_, s)| s.iter().map(|x| x.to_string()))
                .collect(),
            max_difficulty: 2,
            brackets: 0.3,
            quotes: 0.0,
            split: Split::Any,
        }
    }
}

/// `count` distinct prompts: topic → subtopic → prompt, de-duplicated by text (and against
/// `exclude`, e.g. held-out evaluation prompts).
pub fn generate(
    seed: u64,
    count: usize,
    mix: &Mix,
    id_prefix: &str,
    exclude: &HashSet<String>,
) -> Vec<Prompt> {
    let mut rng = Rng::new(seed);
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(count);
    let mut tries = 0;
    while out.len() < count && tries < count * 50 {
        tries += 1;
        let subtopic = &mix.subtopics[rng.below(mix.subtopics.len() as u64) as usize];
        let topic = TOPICS
            .iter()
            .find(|(_, s)| s.contains(&subtopic.as_str()))
            .map_or("other", |(t, _)| t);
        let difficulty = 1 + rng.below(mix.max_difficulty.max(1) as u64) as u32;
        // Without quotes the draws are those of the bracket-only world (the same prompts).
        let format = if rng.unit() < mix.brackets {
            Format::Brackets
        } else if mix.quotes > 0.0 && rng.unit() < mix.quotes / (1.0 - mix.brackets).max(1e-9) {
            Format::Quotes
        } else {
            Format::Plain
        };
        let text = make(&mut rng, subtopic, difficulty, format);
        if !mix.split.contains(&text) || exclude.contains(&text) || !seen.insert(text.clone()) {
            continue;
        }
        out.push(Prompt {
            id: format!("{id_prefix}{}", out.len()),
            prompt: text,
            topic: topic.to_string(),
            subtopic: subtopic.clone(),
            difficulty,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_verification() {
        assert_eq!(answer("add 12 30").as_deref(), Some("42"));
        assert_eq!(answer("sub 3 5").as_deref(), Some("-2"));
        assert_eq!(answer("reverse abc in brackets").as_deref(), Some("[cba]"));
        assert_eq!(answer("add 2 3 in quotes").as_deref(), Some("\"5\""));
        assert_eq!(answer("sort cab").as_deref(), Some("abc"));
        assert_eq!(answer("upper abc").as_deref(), Some("ABC"));
        assert_eq!(answer("count a banana").as_deref(), Some("3"));
        assert!(verify("add 1 2", " 3 "));
        assert!(!verify("add 1 2", "4"));
        assert!(!verify("tell me a joke", "no"));
    }

    #[test]
    fn generator_is_deterministic_distinct_and_verifiable() {
        let a = generate(7, 200, &Mix::default(), "p", &HashSet::new());
        let b = generate(7, 200, &Mix::default(), "p", &HashSet::new());
        assert_eq!(a, b);
        assert_eq!(a.len(), 200);
        let texts: HashSet<_> = a.iter().map(|p| p.prompt.clone()).collect();
        assert_eq!(texts.len(), 200);
        assert!(a.iter().all(|p| answer(&p.prompt).is_some()));
        let held_out = generate(8, 50, &Mix::default(), "e", &texts);
        assert!(held_out.iter().all(|p| !texts.contains(&p.prompt)));
        let train = generate(
            9,
            100,
            &Mix {
                split: Split::Train,
                ..Mix::default()
            },
            "t",
            &HashSet::new(),
        );
        let eval = generate(
            9,
            100,
            &Mix {
                split: Split::HeldOut,
                ..Mix::default()
            },
            "e",
            &HashSet::new(),
        );
        assert!(
            train
                .iter()
                .all(|p| !eval.iter().any(|e| e.prompt == p.prompt))
        );
        assert!(eval.iter().all(|p| Split::HeldOut.contains(&p.prompt)));
        // Quotes change nothing when off, and take their share when on.
        let quoted = Mix {
            quotes: 0.25,
            ..Mix::default()
        };
        let q = generate(7, 400, &quoted, "q", &HashSet::new());
        let share = q
            .iter()
            .filter(|p| p.prompt.ends_with(" in quotes"))
            .count() as f64
            / 400.0;
        assert!((0.17..0.33).contains(&share), "{share}");
        assert!(q.iter().all(|p| answer(&p.prompt).is_some()));
    }
}
