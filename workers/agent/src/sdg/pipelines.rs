//! `synthesize_prompts` on the `openai` backend: the recipe's prompt pipelines, after
//! NeMo-Curator's `NemotronGenerator` (its default templates, its steps):
//!
//! - `open_qa`: macro topics → subtopics → questions per topic → revisions of each question;
//! - `writing`: topics × document types → writing tasks → revisions;
//! - `closed_qa`: documents (a JSONL file) → instructions per document, joined to it by a
//!   template;
//! - `math`: macro topics at a school level → subtopics → problems (general or beginner);
//! - `coding`: concepts of a language → subconcepts → problems (beginner, intermediate or
//!   advanced);
//! - `none`: seed prompts only.
//!
//! `topics` replaces the topic steps (for math and coding, the keywords). Each step is one
//! request per item of the step before it, at most `concurrency` in flight, each with its own
//! seed (`seed` + request index), and its answer is read as a list (`lists::parse_list`). An
//! answer that is no list is a conversion failure: counted, its branch dropped, and fatal only
//! above `max_conversion_failure_rate`.
//!
//! Then: seed prompts are mixed in by `seed_share`; exact and near duplicates (also of earlier
//! rounds' prompts, inputs `earlier_prompts`) and prompts sharing an n-gram with evaluation
//! prompts (prompt inputs with `split: held_out`, or `eval_prompts` files) are removed; a share
//! of prompts gets verifiable instructions appended; a share becomes two-turn (the endpoint
//! answers the first turn, then, playing the user, writes a follow-up, or the second turn asks
//! to revise the answer to follow an instruction); each prompt goes to the SFT or the preference
//! pool by a hash of its text. Every prompt records its provenance: pipeline, topics, the
//! templates used, and the endpoint and weights that wrote it.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use super::dedup::{self, Fate};
use super::instructions::{self, Instruction};
use super::{Rng, lists, seeds};
use crate::artifacts;
use crate::backend::{Task, TaskContext, TaskError, TaskResult};
use crate::datasets::{read_jsonl, write_jsonl};
use crate::http_client::{HttpCaller, http_settings};
use crate::openai::{Sampling, Server, Weights, ask};
use flywheel_proto::stage::{OpenaiPrompts, Role};

/// The default templates, by step name: NeMo-Curator's defaults (`nemo_curator/synthetic/prompts.py`),
/// wording and typos kept as closely as known.
pub const DEFAULT_TEMPLATES: &[(&str, &str)] = &[
    (
        "macro_topics",
        "Can you generate {n_macro_topics} comprehensive topics that encompass various aspects of our daily life, the world, and science? Your answer should be a list of topics. Make the topics as diverse as possible.For example, 1. Food and drinks. \n2. Technology.\n",
    ),
    (
        "subtopics",
        "Can you generate {n_subtopics} comprehensive topics that encompass various aspects of {macro_topic}? Your answer should be a list of topics. Make the topics as diverse as possible.",
    ),
    (
        "questions",
        "Can you generate {n_openlines} questions or requests related to {topic}? The questions and requests should be as diverse possible. Your answer should be a list.",
    ),
    (
        "revise",
        "Question: {openline}\n\nCan you revise the question above to include more contexts or details? The revised questions can be any of the follows:\n1. Adding some context to the original question. The context might state the importance of the question, explain background knowledge, or add other reasonable information.\n2. Change the questions into a different format or style, e.g., imperative statements, length requirements for the answer, etc.\n3. Elongated questions that require to elaborate on specific topic or discuss a certain point.\n4. Any other related questions or statements.\n\nThe revised question should contain two, three, or four sentences. You should generate {n_revisions} revised questions or statements in a list. Make them as diverse as possible.",
    ),
    (
        "writing_tasks",
        "Can you generate {n_openlines} tasks, each of which requires to create a \"{text_material_type}\" related to {topic}? Each task should be concise and include one or two sentences only. The tasks should be as diverse as possible. Your answer should be a list of tasks.",
    ),
    (
        "revise_writing",
        "TASK: {openline}\n\nCan you revise the task above to include more detailed requirements? These requirements can be any of the follows:\n1. Require to elaborate on a specific topic or discuss a certain point.\n2. Require to include some examples, data points, or references.\n3. Require to follow specific formats or styles, e.g., no more than 300 words, including specific words, etc.\n4. Any other reasonable requests to make the task more detailed.\n\nThe revised task should contain two, three, or four sentences. You should generate {n_revisions} revised tasks in a list. Make the tasks as diverse as possible.",
    ),
    (
        "closed_qa",
        "TEXT: {document}\n\nGiven the text above, can you come up with {n_openlines} questions or tasks? They can be any of the follows:\n1. Asking certain information in the text;\n2. Summarizing, repharsing or explaining the text;\n3. Writing something similar to the text;\n4. Any other reasonable requests related to the text.\n\nMake the questions or tasks as diverse as possible.",
    ),
    ("closed_qa_join", "{document}\n\n{openline}"),
    (
        "math_macro_topics",
        "Can you generate {n_macro_topics} comprehensive topics that encompass the mathematics knowledge taughted in {school_level}? Your answer should be a list of topics. Make the topics as diverse as possible.",
    ),
    (
        "math_subtopics",
        "List {n_subtopics} mathemathics topics that encompass various aspects of \"{macro_topic}\". Your answer should be a list of topics. Make the topics as diverse as possible.",
    ),
    (
        "math_problems",
        "Generate {n_openlines} mathematics problems which are related to \"{topic}\" or can be addressed using \"{topic}\". Your answer should be a list of problems. Make them as diverse as possible.",
    ),
    (
        "math_problems_beginner",
        "Generate {n_openlines} mathematics problems which are related to \"{topic}\" or can be addressed using \"{topic}\". These problems should be suitable for beginners who just learnt \"{topic}\". Your answer should be a list of problems. Make them as diverse as possible.",
    ),
    (
        "coding_macro_topics",
        "List {n_macro_topics} important concepts in the {language} language.",
    ),
    (
        "coding_subtopics",
        "List {n_subtopics} important concepts related to \"{macro_topic}\" in the {language} language.",
    ),
    (
        "coding_problems",
        "Generate {n_openlines} {language} coding problems related to \"{topic}\". These problems should be suitable for beginners who just learnt \"{topic}\". Your answer should be a list of problems. Make them as diverse as possible.",
    ),
    (
        "coding_problems_intermediate",
        "Generate {n_openlines} {language} coding problems related to \"{topic}\". These problems should be suitable for medium-level programmers with some experiences of \"{topic}\". Your answer should be a list of problems. Make them as diverse as possible.",
    ),
    (
        "coding_problems_advanced",
        "Generate {n_openlines} {language} coding problems related to \"{topic}\". These problems should be suitable for advanced programmers with solid knowledge and experiences of \"{topic}\". Your answer should be a list of problems. Make them as diverse as possible.",
    ),
    (
        "follow_up",
        "Here is a conversation between a user and an assistant.\n<|The Start of Assistant's Conversation with User|>\n{conversation}\n<|The End of Assistant's Conversation with User|>\n\nGiven the conversation above, generate a followup request or question in the tone of User. Directly give me the question without extraneous words.",
    ),
    (
        "revise_turn",
        "Please revise your previous response. {instruction}",
    ),
];

const DOCUMENT_TYPES: [&str; 5] = ["Essay", "Email", "Poem", "Blog post", "Story"];

/// A prompt on its way out, with where it came from.
#[derive(Debug, Clone)]
struct Candidate {
    prompt: String,
    provenance: Value,
    /// A seed conversation (TRL `messages`), ending with the user turn `prompt`.
    messages: Option<Value>,
    /// Verifiable instructions a seed prompt came with.
    instructions: Vec<Instruction>,
}

impl Candidate {
    fn new(prompt: String, provenance: Value) -> Self {
        Self {
            prompt,
            provenance,
            messages: None,
            instructions: Vec::new(),
        }
    }
}

/// Counts the stage reports.
#[derive(Debug, Default)]
struct Counts {
    list_requests: usize,
    conversion_failures: usize,
}

struct Writer<'a> {
    task: &'a Task,
    ctx: &'a TaskContext,
    p: &'a OpenaiPrompts,
    caller: HttpCaller,
    sampling: Sampling,
    templates: BTreeMap<String, String>,
    counts: Counts,
    served: Vec<String>,
    /// Requests sent so far: each request's seed is `seed` + its index.
    sent: u64,
}

/// Fills `{name}` placeholders; `{{` and `}}` are literal braces.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = template.replace("{{", "\u{0}").replace("}}", "\u{1}");
    for (k, v) in values {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out.replace('\u{0}', "{").replace('\u{1}', "}")
}

impl Writer<'_> {
    fn template(&self, key: &str) -> &str {
        self.templates.get(key).map_or("", String::as_str)
    }

    /// One request per conversation to the writer; the answers' texts, in order.
    fn complete(&mut self, prompts: Vec<Value>, what: &str) -> Result<Vec<String>, TaskError> {
        let sampling = self.sampling.clone();
        let answers = self.complete_with(&sampling, prompts, what)?;
        Ok(answers
            .into_iter()
            .map(|(text, by)| {
                self.served.push(by);
                text
            })
            .collect())
    }

    /// One request per conversation with `sampling`; each answer's text and the weights that
    /// answered it, in order.
    fn complete_with(
        &mut self,
        sampling: &Sampling,
        prompts: Vec<Value>,
        what: &str,
    ) -> Result<Vec<(String, String)>, TaskError> {
        let first_seed = self.p.seed.wrapping_add(self.sent);
        self.sent += prompts.len() as u64;
        let shared = (self.caller.clone(), sampling.clone(), Arc::new(prompts));
        let n = shared.2.len();
        let answers = self.caller.run_all(n, self.ctx, what, move |i| {
            let (caller, sampling, prompts) = shared.clone();
            async move {
                let body =
                    sampling.body_messages(&prompts[i], 1, first_seed.wrapping_add(i as u64));
                ask(&caller, &sampling, &body).await
            }
        })?;
        Ok(answers)
    }

    /// Asks each prompt for a list; per prompt, its items (empty when the answer was no list,
    /// a conversion failure).
    fn lists(&mut self, prompts: Vec<String>, what: &str) -> Result<Vec<Vec<String>>, TaskError> {
        let messages = prompts
            .iter()
            .map(|p| json!([{ "role": "user", "content": p }]))
            .collect();
        let answers = self.complete(messages, what)?;
        self.counts.list_requests += answers.len();
        Ok(answers
            .iter()
            .map(|a| match lists::parse_list(a) {
                Ok(items) => items,
                Err(e) => {
                    tracing::debug!(stage = %self.task.assignment.stage, error = %e, "conversion failure");
                    self.counts.conversion_failures += 1;
                    Vec::new()
                }
            })
            .collect())
    }

    /// Runs `template` once per item of `items` (placeholders: the item under `key`, and
    /// `extra`), returning (item index, answer item) pairs, at most `limit` per item.
    fn expand(
        &mut self,
        step: &str,
        key: &str,
        items: &[String],
        extra: &[(&str, String)],
        limit: usize,
    ) -> Result<Vec<(usize, String)>, TaskError> {
        let template = self.template(step).to_string();
        let prompts: Vec<String> = items
            .iter()
            .map(|item| {
                let mut values: Vec<(&str, &str)> = vec![(key, item.as_str())];
                values.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
                fill(&template, &values)
            })
            .collect();
        let lists = self.lists(prompts, step)?;
        Ok(lists
            .into_iter()
            .enumerate()
            .flat_map(|(i, l)| l.into_iter().take(limit).map(move |x| (i, x)))
            .collect())
    }

    /// The given `topics`, or the macro topics the endpoint lists for `step`.
    fn macro_topics(
        &mut self,
        step: &str,
        extra: &[(&str, String)],
    ) -> Result<Vec<String>, TaskError> {
        let p = self.p;
        if let Some(t) = &p.topics {
            return Ok(t.clone());
        }
        let mut values = vec![("n_macro_topics", p.n_macro_topics.to_string())];
        values.extend(extra.iter().cloned());
        let values: Vec<(&str, &str)> = values.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let prompt = fill(self.template(step), &values);
        let mut l = self.lists(vec![prompt], step)?;
        Ok(l.remove(0)
            .into_iter()
            .take(p.n_macro_topics as usize)
            .collect())
    }

    /// Macro topics (or the given ones), then subtopics of each; returns (macro, topic) pairs.
    fn topics(
        &mut self,
        macro_step: &str,
        sub_step: &str,
        extra: &[(&str, String)],
    ) -> Result<Vec<(String, String)>, TaskError> {
        let p = self.p;
        let macros = self.macro_topics(macro_step, extra)?;
        if p.topics.is_some() || p.n_subtopics == 0 {
            return Ok(macros.iter().map(|m| (m.clone(), m.clone())).collect());
        }
        let mut values = vec![("n_subtopics", p.n_subtopics.to_string())];
        values.extend(extra.iter().cloned());
        let subs = self.expand(
            sub_step,
            "macro_topic",
            &macros,
            &values,
            p.n_subtopics as usize,
        )?;
        Ok(subs
            .into_iter()
            .map(|(i, s)| (macros[i].clone(), s))
            .collect())
    }

    /// The revision step: each candidate replaced by its revisions (none asked: kept).
    fn revise(&mut self, step: &str, cands: Vec<Candidate>) -> Result<Vec<Candidate>, TaskError> {
        let n = self.p.n_revisions;
        if n == 0 {
            return Ok(cands);
        }
        let lines: Vec<String> = cands.iter().map(|c| c.prompt.clone()).collect();
        let revised = self.expand(
            step,
            "openline",
            &lines,
            &[("n_revisions", n.to_string())],
            n as usize,
        )?;
        Ok(revised
            .into_iter()
            .map(|(i, text)| {
                let mut provenance = cands[i].provenance.clone();
                provenance["original"] = json!(cands[i].prompt);
                push_template(&mut provenance, step);
                Candidate::new(text, provenance)
            })
            .collect())
    }

    fn pipeline(&mut self) -> Result<Vec<Candidate>, TaskError> {
        let p = self.p;
        let base = |macro_topic: &str, topic: &str, templates: &[&str]| {
            json!({
                "pipeline": p.pipeline, "macro_topic": macro_topic, "topic": topic,
                "templates": templates,
            })
        };
        let openlines = p.n_openlines as usize;
        Ok(match p.pipeline.as_str() {
            "open_qa" => {
                let topics = self.topics("macro_topics", "subtopics", &[])?;
                let names: Vec<String> = topics.iter().map(|(_, t)| t.clone()).collect();
                let questions = self.expand(
                    "questions",
                    "topic",
                    &names,
                    &[("n_openlines", openlines.to_string())],
                    openlines,
                )?;
                let steps = topic_steps(p, "macro_topics", "subtopics");
                let cands = questions
                    .into_iter()
                    .map(|(i, q)| {
                        let mut t = steps.clone();
                        t.push("questions");
                        Candidate::new(q, base(&topics[i].0, &topics[i].1, &t))
                    })
                    .collect();
                self.revise("revise", cands)?
            }
            "writing" => {
                let topics = self.macro_topics("macro_topics", &[])?;
                let types: Vec<String> = p
                    .document_types
                    .clone()
                    .unwrap_or_else(|| DOCUMENT_TYPES.iter().map(|s| s.to_string()).collect());
                let pairs: Vec<(String, String)> = topics
                    .iter()
                    .flat_map(|t| types.iter().map(move |d| (t.clone(), d.clone())))
                    .collect();
                let template = self.template("writing_tasks").to_string();
                let n = openlines.to_string();
                let prompts = pairs
                    .iter()
                    .map(|(t, d)| {
                        fill(
                            &template,
                            &[("n_openlines", &n), ("topic", t), ("text_material_type", d)],
                        )
                    })
                    .collect();
                let lists = self.lists(prompts, "writing_tasks")?;
                let mut steps: Vec<&str> = if p.topics.is_none() {
                    vec!["macro_topics"]
                } else {
                    vec![]
                };
                steps.push("writing_tasks");
                let mut cands = Vec::new();
                for (i, l) in lists.into_iter().enumerate() {
                    for task in l.into_iter().take(openlines) {
                        let mut provenance = base(&pairs[i].0, &pairs[i].0, &steps);
                        provenance["document_type"] = json!(pairs[i].1);
                        cands.push(Candidate::new(task, provenance));
                    }
                }
                self.revise("revise_writing", cands)?
            }
            "closed_qa" => {
                let uri = p.documents.as_deref().unwrap_or_default();
                let docs = documents(uri, &self.task.assignment.stage)?;
                let texts: Vec<String> = docs.iter().map(|(_, t)| t.clone()).collect();
                let asked = self.expand(
                    "closed_qa",
                    "document",
                    &texts,
                    &[("n_openlines", openlines.to_string())],
                    openlines,
                )?;
                let join = self.template("closed_qa_join").to_string();
                asked
                    .into_iter()
                    .map(|(i, line)| {
                        let mut provenance = base("", "", &["closed_qa", "closed_qa_join"]);
                        provenance["document"] = json!({ "uri": uri, "line": docs[i].0 });
                        provenance["instruction"] = json!(line);
                        Candidate::new(
                            fill(&join, &[("document", &texts[i]), ("openline", &line)]),
                            provenance,
                        )
                    })
                    .collect()
            }
            "math" | "coding" => {
                let math = p.pipeline == "math";
                let (macro_step, sub_step) = if math {
                    ("math_macro_topics", "math_subtopics")
                } else {
                    ("coding_macro_topics", "coding_subtopics")
                };
                let extra = if math {
                    vec![("school_level", p.school_level.clone())]
                } else {
                    vec![("language", p.language.clone())]
                };
                let topics = self.topics(macro_step, sub_step, &extra)?;
                let level = p
                    .level
                    .clone()
                    .unwrap_or_else(|| if math { "general" } else { "beginner" }.into());
                let problem_step = match (math, level.as_str()) {
                    (true, "beginner") => "math_problems_beginner",
                    (true, _) => "math_problems",
                    (false, "intermediate") => "coding_problems_intermediate",
                    (false, "advanced") => "coding_problems_advanced",
                    (false, _) => "coding_problems",
                };
                let names: Vec<String> = topics.iter().map(|(_, t)| t.clone()).collect();
                let mut values = vec![("n_openlines", openlines.to_string())];
                values.extend(extra.iter().cloned());
                let problems = self.expand(problem_step, "topic", &names, &values, openlines)?;
                let mut steps = topic_steps(p, macro_step, sub_step);
                steps.push(problem_step);
                problems
                    .into_iter()
                    .map(|(i, text)| {
                        let mut provenance = base(&topics[i].0, &topics[i].1, &steps);
                        provenance["level"] = json!(level);
                        Candidate::new(text, provenance)
                    })
                    .collect()
            }
            _ => Vec::new(),
        })
    }
}

/// The topic steps a pipeline ran: none when `topics` were given.
fn topic_steps<'a>(p: &OpenaiPrompts, macro_step: &'a str, sub_step: &'a str) -> Vec<&'a str> {
    match (&p.topics, p.n_subtopics) {
        (Some(_), _) => vec![],
        (None, 0) => vec![macro_step],
        (None, _) => vec![macro_step, sub_step],
    }
}

fn push_template(provenance: &mut Value, step: &str) {
    match provenance["templates"].as_array_mut() {
        Some(t) => t.push(json!(step)),
        None => provenance["templates"] = json!([step]),
    }
}

/// Makes the `chosen` rows (index, revise) conversations of `dialogue_turns` user turns: each
/// turn after the first follows a reply to the conversation so far (by `reply`, the generator's
/// endpoint, else the writer), and is written by the writer playing the user; a revise row's last
/// turn instead asks to revise the answer to follow an instruction, which the row then carries.
fn converse(
    w: &mut Writer<'_>,
    reply: &Option<(Server, Sampling)>,
    rows: &mut [Value],
    chosen: &[(usize, bool)],
    types: &[String],
    rng: &mut Rng,
) -> Result<(), TaskError> {
    let p = w.p;
    let turns = p.dialogue_turns.max(2) as usize;
    let mut convs: Vec<Vec<Value>> = chosen
        .iter()
        .map(|(i, _)| vec![json!({ "role": "user", "content": rows[*i]["prompt"] })])
        .collect();
    let mut reply_served = Vec::new();
    let mut revised: BTreeMap<usize, Vec<Instruction>> = BTreeMap::new();
    for turn in 2..=turns {
        let asked: Vec<Value> = convs.iter().map(|c| json!(c)).collect();
        let replies: Vec<String> = match reply {
            Some((_, sampling)) => w
                .complete_with(sampling, asked, "replies")?
                .into_iter()
                .map(|(text, by)| {
                    reply_served.push(by);
                    text
                })
                .collect(),
            None => w.complete(asked, "replies")?,
        };
        let mut follow_ups = Vec::new();
        let mut asking = Vec::new();
        for (k, text) in replies.into_iter().enumerate() {
            convs[k].push(json!({ "role": "assistant", "content": text }));
            if turn == turns && chosen[k].1 {
                let first = convs[k][0]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let ins = draw_instructions(types, p.max_instructions as usize, rng, &first);
                let ask = fill(
                    w.template("revise_turn"),
                    &[("instruction", &instruction_text(&ins))],
                );
                convs[k].push(json!({ "role": "user", "content": ask }));
                revised.insert(k, ins);
            } else {
                let conversation = crate::datasets::conversation_text(&json!(convs[k]), false);
                let ask = fill(w.template("follow_up"), &[("conversation", &conversation)]);
                follow_ups.push(json!([{ "role": "user", "content": ask }]));
                asking.push(k);
            }
        }
        for (k, text) in asking
            .into_iter()
            .zip(w.complete(follow_ups, "follow-ups")?)
        {
            convs[k].push(json!({ "role": "user", "content": text.trim() }));
        }
    }
    let replied_by = match reply {
        Some((server, _)) => {
            let weights = Weights::check(w.task, server, reply_served.iter())?;
            Some(json!({
                "endpoint": p.reply_endpoint, "model_id": server.endpoint.as_ref().map(|e| &e.model_id),
                "served_hashes": weights.hashes, "weights_verified": weights.verified,
            }))
        }
        None => None,
    };
    for (k, (i, revise)) in chosen.iter().enumerate() {
        let row = &mut rows[*i];
        row["prompt"] = convs[k].last().expect("a user turn")["content"].clone();
        row["messages"] = json!(convs[k]);
        if let Some(r) = &replied_by {
            row["provenance"]["replied_by"] = r.clone();
        }
        push_template(
            &mut row["provenance"],
            if *revise { "revise_turn" } else { "follow_up" },
        );
        if let Some(ins) = revised.remove(&k) {
            row["instructions"] = json!(ins);
        }
    }
    Ok(())
}

/// The texts of instructions, as appended to a prompt.
fn instruction_text(ins: &[Instruction]) -> String {
    ins.iter()
        .map(Instruction::text)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads an artifact URI and hashes it; errors name the param and the URI.
fn read_bytes(uri: &str, param: &str, stage: &str) -> Result<(Vec<u8>, String), TaskError> {
    let bytes = artifacts::read(uri, "")
        .map_err(|e| TaskError::permanent(format!("stage {stage}: params.{param}: {e}")))?;
    let hash = artifacts::content_hash(&bytes);
    Ok((bytes, hash))
}

/// Reads an artifact URI as text; errors name the param and the URI.
fn read_text(uri: &str, param: &str, stage: &str) -> Result<(String, String), TaskError> {
    let (bytes, hash) = read_bytes(uri, param, stage)?;
    String::from_utf8(bytes).map(|t| (t, hash)).map_err(|_| {
        TaskError::permanent(format!(
            "stage {stage}: params.{param}: {uri} is not UTF-8 text"
        ))
    })
}

/// closed_qa's documents: (line, text) of a JSONL file with `text` or `document` per line.
fn documents(uri: &str, stage: &str) -> Result<Vec<(usize, String)>, TaskError> {
    let (text, _) = read_text(uri, "documents", stage)?;
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| {
            TaskError::permanent(format!(
                "stage {stage}: {uri}: line {}: invalid JSON: {e}",
                i + 1
            ))
        })?;
        let doc = v["text"]
            .as_str()
            .or_else(|| v["document"].as_str())
            .ok_or_else(|| {
                TaskError::permanent(format!(
                    "stage {stage}: {uri}: line {}: missing column text (or document)",
                    i + 1
                ))
            })?;
        docs.push((i + 1, doc.to_string()));
    }
    if docs.is_empty() {
        return Err(TaskError::permanent(format!(
            "stage {stage}: {uri}: the documents file is empty"
        )));
    }
    Ok(docs)
}

/// The `synthesize_prompts` stage on `openai`.
pub fn synthesize(task: &Task, ctx: &TaskContext, prefix: &str) -> Result<TaskResult, TaskError> {
    let stage = task.assignment.stage.clone();
    let p: OpenaiPrompts = task.typed()?;
    let generator = task.input(Role::Generator)?;
    let needs_llm = p.pipeline != "none" || p.two_turn_share > 0.0;
    let server = if needs_llm {
        Some(Server::resolve(task, "endpoint", &p.endpoint, &p.base_url)?)
    } else {
        None
    };
    let sampling = {
        let base = server.as_ref().map_or("", |s| s.base.as_str());
        let model = p.model.clone().unwrap_or_else(|| {
            server.as_ref().map_or_else(
                || generator.name.clone(),
                |s| s.default_model(&generator.name),
            )
        });
        Sampling::new(base, "chat", model, p.temperature, p.top_p, p.max_tokens)
    };
    let reply = match &p.reply_endpoint {
        Some(name) => {
            let server = Server::resolve(task, "reply_endpoint", &Some(name.clone()), &None)?;
            let model = server.default_model(&generator.name);
            let sampling = Sampling::new(
                &server.base,
                "chat",
                model,
                p.temperature,
                p.top_p,
                p.max_tokens,
            );
            Some((server, sampling))
        }
        None => None,
    };
    let mut templates: BTreeMap<String, String> = DEFAULT_TEMPLATES
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    templates.extend(p.templates.clone().unwrap_or_default());
    let mut w = Writer {
        task,
        ctx,
        p: &p,
        caller: HttpCaller::new(task, http_settings!(p))?,
        sampling,
        templates,
        counts: Counts::default(),
        served: Vec::new(),
        sent: 0,
    };
    let mut rng = Rng::new(
        p.seed
            ^ super::stable_hash(&task.assignment.campaign_id)
            ^ u64::from(task.assignment.round_index as u32),
    );

    // 1. The pipeline's prompts, and the conversion failures it met.
    let synthetic = w.pipeline()?;
    let failure_rate = w.counts.conversion_failures as f64 / w.counts.list_requests.max(1) as f64;
    if failure_rate > p.max_conversion_failure_rate {
        return Err(TaskError::permanent(format!(
            "stage {stage}: {} of {} answers were not lists ({:.0}%, above max_conversion_failure_rate {}): check the endpoint's model and the templates",
            w.counts.conversion_failures,
            w.counts.list_requests,
            failure_rate * 100.0,
            p.max_conversion_failure_rate
        )));
    }

    // 2. Seed prompts, mixed in by share.
    let mut seeded: Vec<Candidate> = Vec::new();
    let mut seed_hash = None;
    if let Some(uri) = &p.seeds {
        let (bytes, hash) = read_bytes(uri, "seeds", &stage)?;
        let mut all = seeds::parse_file(&bytes, uri)
            .map_err(|e| TaskError::permanent(format!("stage {stage}: {e}")))?;
        shuffle(&mut all, &mut rng);
        let take = if p.pipeline == "none" {
            all.len()
        } else {
            ((synthetic.len() as f64 * p.seed_share / (1.0 - p.seed_share)).round() as usize)
                .min(all.len())
        };
        for s in all.into_iter().take(take) {
            let mut c = Candidate::new(
                s.prompt,
                json!({ "pipeline": "seed", "seed_file": uri, "seed_hash": hash, "line": s.line }),
            );
            c.messages = s.messages;
            c.instructions = s.instructions;
            seeded.push(c);
        }
        seed_hash = Some(hash);
    }
    let synthetic_count = synthetic.len();
    let seed_count = seeded.len();
    let mut cands = synthetic;
    cands.extend(seeded);

    // 3. Duplicates, earlier rounds, evaluation prompts.
    // Evaluation prompts are asked again every round: only training prompts must be new.
    let earlier: Vec<String> = if p.dedup && p.split != "held_out" {
        read_jsonl(&task.inputs(Role::EarlierPrompts))?
            .iter()
            .filter_map(|r| r["prompt"].as_str().map(String::from))
            .collect()
    } else {
        Vec::new()
    };
    let mut eval: Vec<String> = Vec::new();
    if p.decontaminate {
        let mut rows: Vec<Value> = read_jsonl(&task.inputs(Role::Prompts))?
            .into_iter()
            .filter(|r| r["split"] == "held_out")
            .collect();
        for uri in p.eval_prompts.iter().flatten() {
            let (text, _) = read_text(uri, "eval_prompts", &stage)?;
            rows.extend(crate::datasets::parse_jsonl(&text, uri).map_err(|e| {
                TaskError::permanent(format!("stage {stage}: params.eval_prompts: {e}"))
            })?);
        }
        eval = rows
            .iter()
            .filter_map(|r| r["prompt"].as_str().map(String::from))
            .collect();
    }
    let texts: Vec<&str> = cands.iter().map(|c| c.prompt.as_str()).collect();
    let earlier_refs: Vec<&str> = earlier.iter().map(String::as_str).collect();
    let eval_refs: Vec<&str> = eval.iter().map(String::as_str).collect();
    let settings = dedup::Settings {
        duplicates: p.dedup,
        threshold: p.near_duplicate_threshold,
        ngram: p.decontamination_ngram as usize,
        ..dedup::Settings::default()
    };
    let fates = dedup::dedup(&texts, &earlier_refs, &eval_refs, settings);
    let (_, exact, near, earlier_round, contaminated) = dedup::tally(&fates);
    let mut kept: Vec<Candidate> = cands
        .into_iter()
        .zip(&fates)
        .filter(|(_, f)| **f == Fate::Kept)
        .map(|(c, _)| c)
        .collect();
    if p.max_prompts > 0 {
        kept.truncate(p.max_prompts as usize);
    }

    // 4. Verifiable instructions and two-turn prompts.
    let types: Vec<String> = p
        .instruction_types
        .clone()
        .unwrap_or_else(|| instructions::IDS.iter().map(|s| s.to_string()).collect());
    let mut rows: Vec<Value> = Vec::with_capacity(kept.len());
    let mut two_turn = Vec::new();
    for (i, c) in kept.into_iter().enumerate() {
        let mut row = json!({
            "id": format!("{}-r{}-{i}", stage, task.assignment.round_index),
            "prompt": c.prompt, "provenance": c.provenance,
        });
        if let Some(m) = c.messages {
            row["messages"] = m;
        }
        if !c.instructions.is_empty() {
            row["instructions"] = json!(c.instructions);
        } else if rng.unit() < p.two_turn_share && row.get("messages").is_none() {
            let revise = rng.unit() < p.revise_share;
            two_turn.push((rows.len(), revise));
        } else if rng.unit() < p.instruction_share {
            let base = row["prompt"].as_str().unwrap_or_default().to_string();
            let ins = draw_instructions(&types, p.max_instructions as usize, &mut rng, &base);
            let asked = json!(format!("{base} {}", instruction_text(&ins)));
            // A conversation's last user turn is the prompt.
            if let Some(last) = row["messages"].as_array_mut().and_then(|m| m.last_mut()) {
                last["content"] = asked.clone();
            }
            row["prompt"] = asked;
            row["instructions"] = json!(ins);
        }
        rows.push(row);
    }
    if !two_turn.is_empty() {
        converse(&mut w, &reply, &mut rows, &two_turn, &types, &mut rng)?;
    }

    // 5. Pools, provenance of the weights, output.
    let weights = match &server {
        Some(s) => Some(Weights::check(task, s, w.served.iter())?),
        None => None,
    };
    let writer = server.as_ref().map(|s| match &s.endpoint {
        Some(e) => json!({ "endpoint": e.name, "model_id": e.model_id, "content_hash": e.content_hash, "served_name": e.served_name }),
        None => json!({ "base_url": s.base, "model": w.sampling.model }),
    });
    let (mut pool_sft, mut pool_pref) = (0, 0);
    let mut per_pipeline: BTreeMap<String, usize> = BTreeMap::new();
    for row in &mut rows {
        let key = row["messages"]
            .as_array()
            .and_then(|m| m.first())
            .and_then(|m| m["content"].as_str())
            .or_else(|| row["prompt"].as_str())
            .unwrap_or_default()
            .to_string();
        let h = super::stable_hash(&dedup::normalise(&key));
        if p.split == "held_out" {
            row["split"] = json!("held_out");
        } else if ((h >> 11) as f64 / (1u64 << 53) as f64) < p.preference_share {
            row["pool"] = json!("preference");
            pool_pref += 1;
        } else {
            row["pool"] = json!("sft");
            pool_sft += 1;
        }
        let source = row["provenance"]["pipeline"]
            .as_str()
            .unwrap_or("seed")
            .to_string();
        *per_pipeline.entry(source.clone()).or_default() += 1;
        if source != "seed"
            && let Some(wr) = &writer
        {
            row["provenance"]["written_by"] = wr.clone();
        }
    }
    let mut out = write_jsonl(prefix, Role::Prompts, "flywheel.prompts", &rows)?;
    if let Some(wt) = &weights {
        wt.annotate(&mut out.metadata);
    }
    let removed = json!({ "exact": exact, "near": near, "earlier_round": earlier_round, "contaminated": contaminated });
    out.metadata["pipeline"] = json!(p.pipeline);
    out.metadata["per_pipeline"] = json!(per_pipeline);
    out.metadata["removed"] = removed;
    out.metadata["seed_hash"] = json!(seed_hash);
    out.metadata["params"] = serde_json::to_value(&p).expect("params serialize");
    let mut metrics = w.caller.stats.metric_map();
    for (k, v) in [
        ("prompts", rows.len()),
        ("synthetic_prompts", synthetic_count),
        ("seed_prompts", seed_count),
        ("list_requests", w.counts.list_requests),
        ("conversion_failures", w.counts.conversion_failures),
        ("removed_exact", exact),
        ("removed_near", near),
        ("removed_earlier_round", earlier_round),
        ("removed_contaminated", contaminated),
        (
            "with_instructions",
            rows.iter()
                .filter(|r| r.get("instructions").is_some())
                .count(),
        ),
        (
            "two_turn",
            rows.iter().filter(|r| r.get("messages").is_some()).count(),
        ),
        ("pool_sft", pool_sft),
        ("pool_preference", pool_pref),
    ] {
        metrics.insert(k.into(), v as f64);
    }
    metrics.insert("conversion_failure_rate".into(), failure_rate);
    for (pipeline, n) in per_pipeline {
        metrics.insert(format!("prompts_{pipeline}"), n as f64);
    }
    if let Some(wt) = &weights {
        metrics.insert("weights_verified".into(), f64::from(u8::from(wt.verified)));
    }
    Ok(TaskResult {
        outputs: vec![out],
        metrics,
    })
}

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
}

/// 1 to `most` distinct instruction types from `types`, with random parameters.
fn draw_instructions(
    types: &[String],
    most: usize,
    rng: &mut Rng,
    prompt: &str,
) -> Vec<Instruction> {
    let n = 1 + rng.below(most.min(types.len()).max(1));
    let mut pool: Vec<&String> = types.iter().collect();
    shuffle(&mut pool, rng);
    pool.into_iter()
        .take(n)
        .filter_map(|id| Instruction::sample(id, rng, prompt))
        .collect()
}

/// `docs/prompts.md`: each pipeline's steps, and every default template with its placeholders.
pub fn templates_markdown() -> String {
    use flywheel_proto::stage::{PROMPT_PIPELINES, PROMPT_TURN_TEMPLATES};
    let mut out = String::from(
        "# Prompt-synthesis templates\n\n\
         Generated from `workers/agent/src/sdg/pipelines.rs` (`DEFAULT_TEMPLATES`); a test keeps it \
         current. The defaults follow NeMo-Curator's (`nemo_curator/synthetic/prompts.py`), wording \
         and typos kept as closely as known. Replace any of them with the stage's `templates` param, by step name; a \
         template may use only the placeholders listed for its step (checked at submission). \
         `{{` and `}}` are literal braces.\n\n## Steps of each pipeline\n\n",
    );
    for (pipeline, steps) in PROMPT_PIPELINES {
        let names: Vec<String> = steps.iter().map(|(k, _)| format!("`{k}`")).collect();
        out.push_str(&format!(
            "- `{pipeline}`: {}\n",
            if names.is_empty() {
                "seed prompts only".to_string()
            } else {
                names.join(", ")
            }
        ));
    }
    out.push_str("- every pipeline, for two-turn prompts: `follow_up`, `revise_turn`\n\n## Default templates\n");
    let all = PROMPT_PIPELINES
        .iter()
        .flat_map(|(_, s)| s.iter())
        .chain(PROMPT_TURN_TEMPLATES);
    let mut seen = std::collections::BTreeSet::new();
    for (step, placeholders) in all {
        if !seen.insert(*step) {
            continue;
        }
        let text = DEFAULT_TEMPLATES
            .iter()
            .find(|(k, _)| k == step)
            .map_or("", |(_, t)| t);
        let names: Vec<String> = placeholders.iter().map(|p| format!("`{{{p}}}`")).collect();
        out.push_str(&format!(
            "\n### `{step}`\n\nPlaceholders: {}.\n\n```text\n{}\n```\n",
            names.join(", "),
            text.trim_end()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `FLYWHEEL_WRITE_DOCS=1 cargo test -p flywheel-worker templates_doc` rewrites the file.
    #[test]
    fn templates_doc_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/prompts.md");
        let want = templates_markdown();
        if std::env::var_os("FLYWHEEL_WRITE_DOCS").is_some() {
            std::fs::write(path, &want).unwrap();
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "docs/prompts.md is stale: run FLYWHEEL_WRITE_DOCS=1 cargo test -p flywheel-worker templates_doc"
        );
    }

    #[test]
    fn templates_fill_and_the_defaults_use_only_known_placeholders() {
        assert_eq!(fill("{a} {{b}} {a}", &[("a", "x")]), "x {b} x");
        for (pipeline, steps) in flywheel_proto::stage::PROMPT_PIPELINES {
            for (step, allowed) in steps
                .iter()
                .chain(flywheel_proto::stage::PROMPT_TURN_TEMPLATES)
            {
                let t = DEFAULT_TEMPLATES.iter().find(|(k, _)| k == step);
                let (_, t) = t.unwrap_or_else(|| panic!("{pipeline}: no default template {step}"));
                for name in flywheel_proto::stage::placeholders(t) {
                    assert!(allowed.contains(&name.as_str()), "{step}: {name}");
                }
            }
        }
    }
}
