//! IFEval's verifiable instructions: 24 of its 25 types (all but `language:response_language`,
//! which needs a language detector), each with IFEval's id and parameter names, the text that
//! asks for it, and a checker that decides it from the response alone.
//!
//! `strict` is IFEval's strict test; `loose` also accepts the response with its first line, its
//! last line or both removed, and with `*` removed, as IFEval's loose test does. Counts follow
//! IFEval: words are `\w+` runs; sentences are split at `.`, `!` or `?` followed by space (IFEval
//! uses NLTK's punkt, which differs on abbreviations); the all-capitals and all-lowercase types
//! check case only (IFEval also runs a language detector for "in English").

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Rng;

/// `less than` or `at least`, as IFEval writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Relation {
    #[serde(rename = "less than")]
    LessThan,
    #[serde(rename = "at least")]
    AtLeast,
}

impl Relation {
    fn holds(self, actual: usize, n: usize) -> bool {
        match self {
            Relation::LessThan => actual < n,
            Relation::AtLeast => actual >= n,
        }
    }

    fn text(self) -> &'static str {
        match self {
            Relation::LessThan => "less than",
            Relation::AtLeast => "at least",
        }
    }
}

/// One verifiable instruction with its parameters. Serialized as IFEval's
/// `{"id": "<instruction id>", <kwargs>...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "id", deny_unknown_fields)]
pub enum Instruction {
    #[serde(rename = "keywords:existence")]
    Keywords { keywords: Vec<String> },
    #[serde(rename = "keywords:frequency")]
    KeywordFrequency {
        keyword: String,
        frequency: usize,
        relation: Relation,
    },
    #[serde(rename = "keywords:forbidden_words")]
    ForbiddenWords { forbidden_words: Vec<String> },
    #[serde(rename = "keywords:letter_frequency")]
    LetterFrequency {
        letter: String,
        let_frequency: usize,
        let_relation: Relation,
    },
    #[serde(rename = "length_constraints:number_sentences")]
    NumberSentences {
        num_sentences: usize,
        relation: Relation,
    },
    #[serde(rename = "length_constraints:number_paragraphs")]
    NumberParagraphs { num_paragraphs: usize },
    #[serde(rename = "length_constraints:number_words")]
    NumberWords {
        num_words: usize,
        relation: Relation,
    },
    #[serde(rename = "length_constraints:nth_paragraph_first_word")]
    NthParagraphFirstWord {
        num_paragraphs: usize,
        nth_paragraph: usize,
        first_word: String,
    },
    #[serde(rename = "detectable_content:number_placeholders")]
    Placeholders { num_placeholders: usize },
    #[serde(rename = "detectable_content:postscript")]
    Postscript { postscript_marker: String },
    #[serde(rename = "detectable_format:number_bullet_lists")]
    BulletLists { num_bullets: usize },
    #[serde(rename = "detectable_format:constrained_response")]
    ConstrainedResponse,
    #[serde(rename = "detectable_format:number_highlighted_sections")]
    Highlights { num_highlights: usize },
    #[serde(rename = "detectable_format:multiple_sections")]
    Sections {
        section_spliter: String,
        num_sections: usize,
    },
    #[serde(rename = "detectable_format:json_format")]
    JsonFormat,
    #[serde(rename = "detectable_format:title")]
    Title,
    #[serde(rename = "combination:two_responses")]
    TwoResponses,
    #[serde(rename = "combination:repeat_prompt")]
    RepeatPrompt { prompt_to_repeat: String },
    #[serde(rename = "startend:end_checker")]
    EndChecker { end_phrase: String },
    #[serde(rename = "startend:quotation")]
    Quotation,
    #[serde(rename = "change_case:capital_word_frequency")]
    CapitalWordFrequency {
        capital_frequency: usize,
        capital_relation: Relation,
    },
    #[serde(rename = "change_case:english_capital")]
    AllCapitals,
    #[serde(rename = "change_case:english_lowercase")]
    AllLowercase,
    #[serde(rename = "punctuation:no_comma")]
    NoComma,
}

/// Every instruction id in the catalog, in IFEval's spelling.
pub use flywheel_proto::stage::INSTRUCTION_IDS as IDS;

const CONSTRAINED: [&str; 3] = [
    "My answer is yes.",
    "My answer is no.",
    "My answer is maybe.",
];

/// Words that keyword instructions draw from (a slice of IFEval's word list).
const WORDS: [&str; 24] = [
    "western", "signal", "opposite", "morning", "agency", "primary", "problem", "brush", "garden",
    "market", "history", "balance", "energy", "window", "river", "promise", "season", "engine",
    "pattern", "silver", "voice", "harbor", "letter", "journey",
];

macro_rules! re {
    ($name:ident, $pattern:expr) => {
        static $name: LazyLock<Regex> =
            LazyLock::new(|| Regex::new($pattern).expect("valid pattern"));
    };
}
re!(WORD, r"\w+");
re!(PARAGRAPH_DIVIDER, r"\s?\*\*\*\s?");
re!(PLACEHOLDER, r"\[.*?\]");
re!(BULLET_STAR, r"(?m)^\s*\*[^\*].*$");
re!(BULLET_DASH, r"(?m)^\s*-.*$");
re!(HIGHLIGHT, r"\*[^\n\*]*\*");
re!(DOUBLE_HIGHLIGHT, r"\*\*[^\n\*]*\*\*");
re!(TITLE, r"<<[^\n]+>>");
re!(SENTENCE_END, r#"[.!?]+["')\]]*(\s+|$)"#);

/// Words in IFEval's sense: runs of word characters.
pub fn count_words(text: &str) -> usize {
    WORD.find_iter(text).count()
}

/// Sentences: text up to `.`, `!` or `?` followed by space or the end, skipping common
/// abbreviations and single initials.
pub fn count_sentences(text: &str) -> usize {
    const ABBREVIATIONS: [&str; 12] = [
        "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e",
    ];
    let mut count = 0;
    let mut start = 0;
    for m in SENTENCE_END.find_iter(text) {
        let piece = &text[start..m.start()];
        let last = piece
            .rsplit(|c: char| c.is_whitespace())
            .next()
            .unwrap_or("")
            .to_lowercase();
        let abbreviation = ABBREVIATIONS.contains(&last.as_str())
            || (last.chars().count() == 1 && last.chars().all(char::is_alphabetic));
        if abbreviation && m.end() < text.len() {
            continue;
        }
        if piece.chars().any(char::is_alphanumeric) {
            count += 1;
        }
        start = m.end();
    }
    if text[start..].chars().any(char::is_alphanumeric) {
        count += 1;
    }
    count
}

fn case_insensitive(literal: &str, word_boundaries: bool) -> Regex {
    let escaped = regex::escape(literal);
    let pattern = if word_boundaries {
        format!(r"(?i)\b{escaped}\b")
    } else {
        format!("(?i){escaped}")
    };
    Regex::new(&pattern).expect("escaped literal")
}

/// Python's `str.isupper` / `str.islower`: at least one cased character, and every cased
/// character in that case.
fn all_cased(text: &str, upper: bool) -> bool {
    let mut cased = false;
    for c in text.chars() {
        if c.is_uppercase() || c.is_lowercase() {
            cased = true;
            if c.is_uppercase() != upper {
                return false;
            }
        }
    }
    cased
}

impl Instruction {
    /// IFEval's id of this instruction's type.
    pub fn id(&self) -> &'static str {
        let v = serde_json::to_value(self).expect("instruction serializes");
        let id = v["id"].as_str().expect("tagged");
        IDS.iter()
            .find(|i| **i == id)
            .copied()
            .expect("id in catalog")
    }

    /// From IFEval's `instruction_id_list` entry and its `kwargs`; the error names the id or
    /// the parameter.
    pub fn from_ifeval(id: &str, kwargs: &Value) -> Result<Self, String> {
        if !IDS.contains(&id) {
            return Err(format!("unknown instruction id {id:?}"));
        }
        let mut v = serde_json::Map::new();
        v.insert("id".into(), Value::String(id.into()));
        if let Some(obj) = kwargs.as_object() {
            for (k, val) in obj {
                if !val.is_null() {
                    v.insert(k.clone(), val.clone());
                }
            }
        }
        serde_json::from_value(Value::Object(v)).map_err(|e| format!("instruction {id}: {e}"))
    }

    /// The text appended to a prompt to ask for this instruction.
    pub fn text(&self) -> String {
        use Instruction::*;
        match self {
            Keywords { keywords } => {
                format!("Include keywords {} in the response.", keywords.join(", "))
            }
            KeywordFrequency {
                keyword,
                frequency,
                relation,
            } => format!(
                "In your response, the word {keyword} should appear {} {frequency} times.",
                relation.text()
            ),
            ForbiddenWords { forbidden_words } => format!(
                "Do not include keywords {} in the response.",
                forbidden_words.join(", ")
            ),
            LetterFrequency {
                letter,
                let_frequency,
                let_relation,
            } => format!(
                "In your response, the letter {letter} should appear {} {let_frequency} times.",
                let_relation.text()
            ),
            NumberSentences {
                num_sentences,
                relation,
            } => format!(
                "Your response should contain {} {num_sentences} sentences.",
                relation.text()
            ),
            NumberParagraphs { num_paragraphs } => format!(
                "There should be {num_paragraphs} paragraphs. Paragraphs are separated with the markdown divider: ***"
            ),
            NumberWords {
                num_words,
                relation,
            } => format!("Answer with {} {num_words} words.", relation.text()),
            NthParagraphFirstWord {
                num_paragraphs,
                nth_paragraph,
                first_word,
            } => format!(
                "There should be {num_paragraphs} paragraphs. Paragraphs and only paragraphs are separated with each other by two new lines as if it was '\\n\\n' in python. Paragraph {nth_paragraph} must start with word {first_word}."
            ),
            Placeholders { num_placeholders } => format!(
                "The response must contain at least {num_placeholders} placeholders represented by square brackets, such as [address]."
            ),
            Postscript { postscript_marker } => format!(
                "At the end of your response, please explicitly add a postscript starting with {postscript_marker}"
            ),
            BulletLists { num_bullets } => format!(
                "Your answer must contain exactly {num_bullets} bullet points. Use the markdown bullet points such as:\n* This is point 1. \n* This is point 2"
            ),
            ConstrainedResponse => format!(
                "Answer with one of the following options: {}",
                CONSTRAINED.join(", ")
            ),
            Highlights { num_highlights } => format!(
                "Highlight at least {num_highlights} sections in your answer with markdown, i.e. *highlighted section*."
            ),
            Sections {
                section_spliter,
                num_sections,
            } => format!(
                "Your response must have {num_sections} sections. Mark the beginning of each section with {section_spliter} X, such as:\n{section_spliter} 1\n[content of section 1]\n{section_spliter} 2\n[content of section 2]"
            ),
            JsonFormat => "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.".into(),
            Title => "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.".into(),
            TwoResponses => "Give two different responses. Responses and only responses should be separated by 6 asterisk symbols: ******.".into(),
            RepeatPrompt { .. } => "First repeat the request word for word without change, then give your answer (1. do not say any words or characters before repeating the request; 2. the request you need to repeat does not include this sentence)".into(),
            EndChecker { end_phrase } => format!(
                "Finish your response with this exact phrase {end_phrase}. No other words should follow this phrase."
            ),
            Quotation => "Wrap your entire response with double quotation marks.".into(),
            CapitalWordFrequency {
                capital_frequency,
                capital_relation,
            } => format!(
                "In your response, words with all capital letters should appear {} {capital_frequency} times.",
                capital_relation.text()
            ),
            AllCapitals => "Your entire response should be in English, and in all capital letters.".into(),
            AllLowercase => "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.".into(),
            NoComma => "In your entire response, refrain from the use of any commas.".into(),
        }
    }

    /// IFEval's check of one response text.
    pub fn follows(&self, response: &str) -> bool {
        use Instruction::*;
        match self {
            Keywords { keywords } => keywords
                .iter()
                .all(|k| case_insensitive(k, false).is_match(response)),
            KeywordFrequency {
                keyword,
                frequency,
                relation,
            } => relation.holds(
                case_insensitive(keyword, false).find_iter(response).count(),
                *frequency,
            ),
            ForbiddenWords { forbidden_words } => !forbidden_words
                .iter()
                .any(|w| case_insensitive(w, true).is_match(response)),
            LetterFrequency {
                letter,
                let_frequency,
                let_relation,
            } => {
                let letter = letter.to_lowercase();
                let n = response
                    .to_lowercase()
                    .chars()
                    .filter(|c| letter.starts_with(*c))
                    .count();
                let_relation.holds(n, *let_frequency)
            }
            NumberSentences {
                num_sentences,
                relation,
            } => relation.holds(count_sentences(response), *num_sentences),
            NumberParagraphs { num_paragraphs } => {
                let parts: Vec<&str> = PARAGRAPH_DIVIDER.split(response).collect();
                let mut n = parts.len();
                for (i, p) in parts.iter().enumerate() {
                    if p.trim().is_empty() {
                        if i == 0 || i == parts.len() - 1 {
                            n -= 1;
                        } else {
                            return false;
                        }
                    }
                }
                n == *num_paragraphs
            }
            NumberWords {
                num_words,
                relation,
            } => relation.holds(count_words(response), *num_words),
            NthParagraphFirstWord {
                num_paragraphs,
                nth_paragraph,
                first_word,
            } => {
                let parts: Vec<&str> = response.split("\n\n").collect();
                let n = parts.iter().filter(|p| !p.trim().is_empty()).count();
                if *nth_paragraph == 0 || *nth_paragraph > n {
                    return false;
                }
                let Some(word) = parts[nth_paragraph - 1].split_whitespace().next() else {
                    return false;
                };
                let word = word.trim_start_matches('\'').trim_start_matches('"');
                let first: String = word
                    .chars()
                    .take_while(|c| !".,?!'\"".contains(*c))
                    .flat_map(char::to_lowercase)
                    .collect();
                n == *num_paragraphs && first == first_word.to_lowercase()
            }
            Placeholders { num_placeholders } => {
                PLACEHOLDER.find_iter(response).count() >= *num_placeholders
            }
            Postscript { postscript_marker } => {
                let pattern = match postscript_marker.as_str() {
                    "P.P.S" => r"(?m)\s*p\.\s?p\.\s?s.*$".to_string(),
                    "P.S." => r"(?m)\s*p\.\s?s\..*$".to_string(),
                    other => format!(r"(?m)\s*{}.*$", regex::escape(&other.to_lowercase())),
                };
                Regex::new(&pattern)
                    .expect("escaped marker")
                    .is_match(&response.to_lowercase())
            }
            BulletLists { num_bullets } => {
                BULLET_STAR.find_iter(response).count() + BULLET_DASH.find_iter(response).count()
                    == *num_bullets
            }
            ConstrainedResponse => CONSTRAINED.iter().any(|c| response.trim().contains(c)),
            Highlights { num_highlights } => {
                let single = HIGHLIGHT
                    .find_iter(response)
                    .filter(|m| !m.as_str().trim_matches('*').trim().is_empty())
                    .count();
                let double = DOUBLE_HIGHLIGHT
                    .find_iter(response)
                    .filter(|m| !m.as_str()[2..m.as_str().len() - 2].trim().is_empty())
                    .count();
                single + double >= *num_highlights
            }
            Sections {
                section_spliter,
                num_sections,
            } => {
                let splitter =
                    Regex::new(&format!(r"\s?{}\s?\d+\s?", regex::escape(section_spliter)))
                        .expect("escaped splitter");
                // IFEval: the pieces around the markers, less one.
                splitter.split(response).count() > *num_sections
            }
            JsonFormat => {
                let mut v = response.trim();
                for prefix in ["```json", "```Json", "```JSON", "```"] {
                    if let Some(rest) = v.strip_prefix(prefix) {
                        v = rest;
                        break;
                    }
                }
                let v = v.strip_suffix("```").unwrap_or(v).trim();
                serde_json::from_str::<Value>(v).is_ok()
            }
            Title => TITLE.find_iter(response).any(|m| {
                !m.as_str()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .trim()
                    .is_empty()
            }),
            TwoResponses => {
                let parts: Vec<&str> = response.split("******").collect();
                let mut valid = Vec::new();
                for (i, p) in parts.iter().enumerate() {
                    if p.trim().is_empty() {
                        if i != 0 && i != parts.len() - 1 {
                            return false;
                        }
                    } else {
                        valid.push(p.trim());
                    }
                }
                valid.len() == 2 && valid[0] != valid[1]
            }
            RepeatPrompt { prompt_to_repeat } => response
                .trim()
                .to_lowercase()
                .starts_with(&prompt_to_repeat.trim().to_lowercase()),
            EndChecker { end_phrase } => response
                .trim()
                .trim_matches('"')
                .to_lowercase()
                .ends_with(&end_phrase.trim().to_lowercase()),
            Quotation => {
                let v = response.trim();
                v.chars().count() > 1 && v.starts_with('"') && v.ends_with('"')
            }
            CapitalWordFrequency {
                capital_frequency,
                capital_relation,
            } => {
                let n = WORD
                    .find_iter(response)
                    .filter(|w| all_cased(w.as_str(), true))
                    .count();
                capital_relation.holds(n, *capital_frequency)
            }
            AllCapitals => all_cased(response, true),
            AllLowercase => all_cased(response, false),
            NoComma => !response.contains(','),
        }
    }

    /// IFEval's strict test: the response as given, non-empty.
    pub fn strict(&self, response: &str) -> bool {
        !response.trim().is_empty() && self.follows(response)
    }

    /// IFEval's loose test: the strict test on the response or on it with the first line, the
    /// last line or both removed, each also with `*` removed.
    pub fn loose(&self, response: &str) -> bool {
        let lines: Vec<&str> = response.split('\n').collect();
        let join = |l: &[&str]| l.join("\n").trim().to_string();
        let n = lines.len();
        let first = join(&lines[1.min(n)..]);
        let last = join(&lines[..n.saturating_sub(1)]);
        let both = if n >= 2 {
            join(&lines[1..n - 1])
        } else {
            String::new()
        };
        let variants = [response.to_string(), first, last, both];
        variants
            .iter()
            .flat_map(|v| [v.clone(), v.replace('*', "")])
            .any(|v| self.strict(&v))
    }

    /// A random instruction of type `id` with random parameters. `prompt` is the request a
    /// `combination:repeat_prompt` instruction asks to repeat.
    pub fn sample(id: &str, rng: &mut Rng, prompt: &str) -> Option<Self> {
        use Instruction::*;
        let relation = |rng: &mut Rng| {
            if rng.below(2) == 0 {
                Relation::LessThan
            } else {
                Relation::AtLeast
            }
        };
        let word = |rng: &mut Rng| WORDS[rng.below(WORDS.len())].to_string();
        Some(match id {
            "keywords:existence" => Keywords {
                keywords: vec![word(rng), word(rng)],
            },
            "keywords:frequency" => KeywordFrequency {
                keyword: word(rng),
                frequency: 1 + rng.below(3),
                relation: relation(rng),
            },
            "keywords:forbidden_words" => ForbiddenWords {
                forbidden_words: vec![word(rng), word(rng)],
            },
            "keywords:letter_frequency" => LetterFrequency {
                letter: ((b'a' + rng.below(26) as u8) as char).to_string(),
                let_frequency: 1 + rng.below(10),
                let_relation: relation(rng),
            },
            "length_constraints:number_sentences" => NumberSentences {
                num_sentences: 1 + rng.below(5),
                relation: relation(rng),
            },
            "length_constraints:number_paragraphs" => NumberParagraphs {
                num_paragraphs: 1 + rng.below(5),
            },
            "length_constraints:number_words" => NumberWords {
                num_words: 50 * (1 + rng.below(10)),
                relation: relation(rng),
            },
            "length_constraints:nth_paragraph_first_word" => {
                let num_paragraphs = 2 + rng.below(4);
                NthParagraphFirstWord {
                    num_paragraphs,
                    nth_paragraph: 1 + rng.below(num_paragraphs),
                    first_word: word(rng),
                }
            }
            "detectable_content:number_placeholders" => Placeholders {
                num_placeholders: 1 + rng.below(4),
            },
            "detectable_content:postscript" => Postscript {
                postscript_marker: ["P.S.", "P.P.S"][rng.below(2)].into(),
            },
            "detectable_format:number_bullet_lists" => BulletLists {
                num_bullets: 1 + rng.below(5),
            },
            "detectable_format:constrained_response" => ConstrainedResponse,
            "detectable_format:number_highlighted_sections" => Highlights {
                num_highlights: 1 + rng.below(4),
            },
            "detectable_format:multiple_sections" => Sections {
                section_spliter: ["Section", "SECTION", "PART"][rng.below(3)].into(),
                num_sections: 2 + rng.below(4),
            },
            "detectable_format:json_format" => JsonFormat,
            "detectable_format:title" => Title,
            "combination:two_responses" => TwoResponses,
            "combination:repeat_prompt" => RepeatPrompt {
                prompt_to_repeat: prompt.to_string(),
            },
            "startend:end_checker" => EndChecker {
                end_phrase: [
                    "Is there anything else I can help with?",
                    "Any other questions?",
                ][rng.below(2)]
                .into(),
            },
            "startend:quotation" => Quotation,
            "change_case:capital_word_frequency" => CapitalWordFrequency {
                capital_frequency: 1 + rng.below(10),
                capital_relation: relation(rng),
            },
            "change_case:english_capital" => AllCapitals,
            "change_case:english_lowercase" => AllLowercase,
            "punctuation:no_comma" => NoComma,
            _ => return None,
        })
    }
}

/// How a response did on a prompt's instructions: per instruction, strict and loose.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub strict: Vec<bool>,
    pub loose: Vec<bool>,
}

impl Verdict {
    pub fn of(instructions: &[Instruction], response: &str) -> Self {
        Self {
            strict: instructions.iter().map(|i| i.strict(response)).collect(),
            loose: instructions.iter().map(|i| i.loose(response)).collect(),
        }
    }

    pub fn all_strict(&self) -> bool {
        self.strict.iter().all(|b| *b)
    }

    pub fn all_loose(&self) -> bool {
        self.loose.iter().all(|b| *b)
    }
}

/// Checks a scored row's response against its prompt's instructions, if it has any: records
/// `instructions_followed` (strict and loose, per instruction) and makes `verified` false when
/// one is not strictly followed (ground truth first, as the recipe does). Returns whether all
/// were followed strictly; `None` for a row without instructions.
pub fn check_row(row: &mut Value) -> Result<Option<bool>, String> {
    let list = of_row(row)?;
    if list.is_empty() {
        return Ok(None);
    }
    let v = Verdict::of(&list, row["response"].as_str().unwrap_or_default());
    let ok = v.all_strict();
    row["instructions_followed"] = serde_json::to_value(&v).expect("verdict serializes");
    row["verified"] = Value::Bool(ok && row["verified"].as_bool() != Some(false));
    Ok(Some(ok))
}

/// The instructions a prompt row carries: Flywheel's `instructions: [{"id": ..., kwargs...}]`,
/// or IFEval's `instruction_id_list` with `kwargs`; none if it has neither.
pub fn of_row(row: &Value) -> Result<Vec<Instruction>, String> {
    if let Some(ids) = row.get("instruction_id_list").and_then(Value::as_array) {
        let kwargs = row["kwargs"].as_array().cloned().unwrap_or_default();
        return ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let id = id.as_str().ok_or("instruction_id_list: expected strings")?;
                Instruction::from_ifeval(id, kwargs.get(i).unwrap_or(&Value::Null))
            })
            .collect();
    }
    match row.get("instructions") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| format!("instructions: {e}")),
    }
}

/// IFEval's four accuracies over prompts with instructions: prompt-level (every instruction
/// of the prompt followed) and instruction-level, strict and loose.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accuracy {
    pub prompts: usize,
    pub prompt_strict: f64,
    pub prompt_loose: f64,
    pub instruction_strict: f64,
    pub instruction_loose: f64,
}

impl Accuracy {
    /// Over the pairs of (instructions, response) with at least one instruction; `None` if
    /// there are none.
    pub fn of<'a>(items: impl Iterator<Item = (&'a [Instruction], &'a str)>) -> Option<Self> {
        let (mut prompts, mut ps, mut pl, mut n, mut is, mut il) = (0, 0, 0, 0, 0, 0);
        for (list, response) in items {
            if list.is_empty() {
                continue;
            }
            let v = Verdict::of(list, response);
            prompts += 1;
            ps += usize::from(v.all_strict());
            pl += usize::from(v.all_loose());
            n += list.len();
            is += v.strict.iter().filter(|b| **b).count();
            il += v.loose.iter().filter(|b| **b).count();
        }
        (prompts > 0).then(|| Self {
            prompts,
            prompt_strict: ps as f64 / prompts as f64,
            prompt_loose: pl as f64 / prompts as f64,
            instruction_strict: is as f64 / n as f64,
            instruction_loose: il as f64 / n as f64,
        })
    }

    /// The metrics of `answers` to prompts with `instructions` (none if no prompt has any).
    pub fn metrics_of(
        instructions: &[Vec<Instruction>],
        answers: &[String],
        prefix: &str,
    ) -> Vec<(String, f64)> {
        Self::of(
            instructions
                .iter()
                .zip(answers)
                .map(|(i, a)| (i.as_slice(), a.as_str())),
        )
        .map(|a| a.metrics(prefix))
        .unwrap_or_default()
    }

    /// Metrics named `<prefix>ifeval_prompt_strict` and so on.
    pub fn metrics(&self, prefix: &str) -> Vec<(String, f64)> {
        vec![
            (format!("{prefix}ifeval_prompts"), self.prompts as f64),
            (format!("{prefix}ifeval_prompt_strict"), self.prompt_strict),
            (format!("{prefix}ifeval_prompt_loose"), self.prompt_loose),
            (
                format!("{prefix}ifeval_instruction_strict"),
                self.instruction_strict,
            ),
            (
                format!("{prefix}ifeval_instruction_loose"),
                self.instruction_loose,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ins(id: &str, kwargs: Value) -> Instruction {
        Instruction::from_ifeval(id, &kwargs).unwrap()
    }

    #[test]
    fn every_id_samples_round_trips_and_has_text() {
        let mut rng = Rng::new(7);
        for id in IDS {
            let i = Instruction::sample(id, &mut rng, "Write a poem.").unwrap();
            assert_eq!(i.id(), id);
            let v = serde_json::to_value(&i).unwrap();
            assert_eq!(serde_json::from_value::<Instruction>(v).unwrap(), i);
            assert!(!i.text().is_empty());
        }
        assert!(Instruction::from_ifeval("language:response_language", &json!({})).is_err());
        let e =
            Instruction::from_ifeval("keywords:frequency", &json!({"keyword": "x"})).unwrap_err();
        assert!(
            e.contains("keywords:frequency") && e.contains("frequency"),
            "{e}"
        );
    }

    /// Hand-written responses from IFEval's definitions (the same file lm-eval's own checkers
    /// are run on in `tests/instructions.rs`).
    #[test]
    fn hand_written_cases_strict_and_loose() {
        let cases: Vec<Value> =
            serde_json::from_str(include_str!("../../tests/fixtures/ifeval_cases.json")).unwrap();
        let mut covered = std::collections::BTreeSet::new();
        for c in &cases {
            let id = c["id"].as_str().unwrap();
            let i = ins(id, c["kwargs"].clone());
            let r = c["response"].as_str().unwrap();
            assert_eq!(
                i.strict(r),
                c["strict"].as_bool().unwrap(),
                "strict: {id} on {r:?}"
            );
            assert_eq!(
                i.loose(r),
                c["loose"].as_bool().unwrap(),
                "loose: {id} on {r:?}"
            );
            covered.insert(id);
        }
        assert_eq!(covered.len(), IDS.len(), "every type has cases");
    }

    #[test]
    fn ifeval_accuracies_by_hand() {
        let two = vec![Instruction::NoComma, Instruction::AllLowercase];
        let one = vec![Instruction::Quotation];
        let items: Vec<(&[Instruction], &str)> = vec![
            (&two, "no commas here"),                 // both
            (&two, "Sure, here:\nlower, with comma"), // neither strictly; lowercase loosely
            (&one, "\"quoted\""),                     // follows
            (&[], "ignored"),
        ];
        let a = Accuracy::of(items.into_iter()).unwrap();
        assert_eq!(a.prompts, 3);
        assert!((a.prompt_strict - 2.0 / 3.0).abs() < 1e-9);
        assert!((a.prompt_loose - 2.0 / 3.0).abs() < 1e-9);
        assert!((a.instruction_strict - 3.0 / 5.0).abs() < 1e-9);
        assert!((a.instruction_loose - 4.0 / 5.0).abs() < 1e-9);
        let ifeval = json!({"instruction_id_list": ["punctuation:no_comma", "keywords:existence"],
            "kwargs": [{}, {"keywords": ["river"], "num_words": null}]});
        assert_eq!(of_row(&ifeval).unwrap().len(), 2);
    }

    #[test]
    fn counts() {
        assert_eq!(count_words("Hello, world! It's 2 o'clock."), 7);
        assert_eq!(count_sentences("One. Two! Three?"), 3);
        assert_eq!(count_sentences("Dr. Smith came. He left"), 2);
        assert_eq!(count_sentences(""), 0);
    }

    #[test]
    fn loose_forgives_a_preamble_and_markdown() {
        let i = Instruction::AllLowercase;
        let r = "Sure! Here it is:\nall lowercase here";
        assert!(!i.strict(r));
        assert!(i.loose(r));
        let t = Instruction::Quotation;
        assert!(!t.strict("*\"quoted\"*"));
        assert!(t.loose("*\"quoted\"*"));
        assert!(
            !Instruction::NoComma.strict("   "),
            "an empty response follows nothing"
        );
    }
}
