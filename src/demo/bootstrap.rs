//! The campaign's starting points, made with the builtin engine: a base model pre-trained on
//! unlabelled text of the task world, a deliberately weak generator (the base briefly tuned on a
//! small seed set, the analogue of the recipe's Mixtral), and a reward model trained on
//! programmatically labelled responses.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_nn::VarMap;
use flywheel_builtin::save_checkpoint;
use flywheel_engine::model::{ModelConfig, Transformer};
use flywheel_engine::rng::Rng;
use flywheel_engine::sample::{SampleConfig, sample};
use flywheel_engine::train::{self, TrainConfig};
use flywheel_engine::world::{self, Mix, Split};
use flywheel_engine::{checkpoint, eval, reward};

pub(crate) struct Models {
    pub(crate) base: PathBuf,
    pub(crate) generator: PathBuf,
    pub(crate) reward: PathBuf,
    pub(crate) generator_accuracy: f64,
}

/// One seed example in this many asks for its answer in quotes.
const SEED_QUOTED_EVERY: usize = 6;
/// With quoted seeds, every 4th reward-model prompt asks for quotes.
const RM_QUOTED_EVERY: usize = 4;

/// `prompt` asking for the answer in quotes, where the task world allows it (a plain-format
/// training prompt whose quoted form stays in the training split); else `prompt` unchanged.
fn quoted(prompt: &str) -> String {
    let asked = format!("{prompt}{}", world::Format::Quotes.suffix());
    match world::Format::of(prompt).1 == world::Format::Plain && Split::Train.contains(&asked) {
        true => asked,
        false => prompt.to_string(),
    }
}

pub(crate) fn demo_mix(split: Split) -> Mix {
    Mix {
        subtopics: ["add", "upper", "reverse", "count"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        max_difficulty: 1,
        brackets: 0.2,
        quotes: 0.0,
        split,
    }
}

/// "Unlabelled" text: a prompt of the task world followed by one of its own words echoed back,
/// never the answer. Like web text, it teaches the base to copy from its context (the skill the
/// string tasks build on) without teaching any task.
fn unlabelled(rng: &mut Rng, prompt: &str) -> String {
    let words: Vec<&str> = prompt
        .split(' ')
        .skip(1)
        .filter(|w| !["in", "brackets", "quotes"].contains(w))
        .collect();
    words
        .get(rng.below(words.len().max(1) as u64) as usize)
        .copied()
        .unwrap_or_default()
        .to_string()
}

fn corrupt(answer: &str, rng: &mut Rng) -> String {
    let mut c: Vec<char> = answer.chars().collect();
    if c.is_empty() {
        return "x".into();
    }
    let i = rng.below(c.len() as u64) as usize;
    c[i] = match c[i] {
        '0'..='9' => char::from(b'0' + ((c[i] as u8 - b'0' + 1 + rng.below(8) as u8) % 10)),
        'A'..='Z' => 'Z',
        _ => 'z',
    };
    if rng.unit() < 0.3 {
        c.push(c[0]);
    }
    c.into_iter().collect()
}

/// Steps of each bootstrap phase (tiny shrinks everything, for tests).
struct Budget {
    config: ModelConfig,
    prompts: usize,
    base_steps: usize,
    seed_examples: usize,
    generator_steps: usize,
    reward_examples: usize,
    reward_steps: usize,
}

pub(crate) fn run(
    dir: &Path,
    seed: u64,
    tiny: bool,
    quoted_seeds: bool,
    log: &dyn Fn(&str),
) -> Result<Models> {
    let dev = candle_core::Device::Cpu;
    let b = if tiny {
        Budget {
            config: ModelConfig::tiny(),
            prompts: 200,
            base_steps: 20,
            seed_examples: 40,
            generator_steps: 20,
            reward_examples: 60,
            reward_steps: 20,
        }
    } else {
        Budget {
            config: ModelConfig::small(),
            prompts: 1200,
            base_steps: 200,
            seed_examples: 100,
            generator_steps: 80,
            reward_examples: 600,
            reward_steps: 300,
        }
    };
    let config = b.config.clone();
    let train_prompts = world::generate(
        seed,
        b.prompts,
        &demo_mix(Split::Train),
        "b",
        &HashSet::new(),
    );
    let mut rng = Rng::new(seed ^ 0xB007);

    log("bootstrap: pre-training the base model on unlabelled task-world text");
    let varmap = VarMap::new();
    let base = Transformer::fresh(config.clone(), &varmap, &dev, seed)?;
    let text: Vec<(String, String)> = train_prompts
        .iter()
        .map(|p| (p.prompt.clone(), unlabelled(&mut rng, &p.prompt)))
        .collect();
    let cfg = TrainConfig {
        steps: b.base_steps,
        lr: 3e-3,
        seed,
        ..TrainConfig::default()
    };
    train::sft(&base, &varmap, &text, &cfg, &mut |_, _| true)?;
    let base_dir = dir.join("base");
    save_checkpoint(&base_dir, &config, &varmap)?;

    log("bootstrap: tuning the weak initial generator on a small seed set");
    let varmap = VarMap::new();
    let generator = checkpoint::load_trainable(&base_dir, config.clone(), &varmap, &dev)?;
    // With `quoted_seeds`, a few seed examples answer in quotes (IFEval's startend:quotation):
    // the weak generator then follows the instruction now and then, as a real starting model
    // does, so that samples of later policies can show it for the checkers to reward.
    let seed_set: Vec<(String, String)> = train_prompts
        .iter()
        .take(b.seed_examples)
        .enumerate()
        .map(|(i, p)| {
            let prompt = if quoted_seeds && i % SEED_QUOTED_EVERY == 0 {
                quoted(&p.prompt)
            } else {
                p.prompt.clone()
            };
            let answer = world::answer(&prompt).unwrap_or_default();
            (prompt, answer)
        })
        .collect();
    let cfg = TrainConfig {
        steps: b.generator_steps,
        lr: 2e-3,
        seed: seed + 1,
        ..TrainConfig::default()
    };
    train::sft(&generator, &varmap, &seed_set, &cfg, &mut |_, _| true)?;
    let generator_dir = dir.join("generator");
    save_checkpoint(&generator_dir, &config, &varmap)?;
    let held_out: Vec<String> =
        world::generate(1234, 200, &demo_mix(Split::HeldOut), "e", &HashSet::new())
            .into_iter()
            .map(|p| p.prompt)
            .collect();
    let generator_accuracy = eval::accuracy(&held_out, &eval::answers(&generator, &held_out)?);

    log("bootstrap: training the reward model on programmatically labelled responses");
    // With `quoted_seeds` the reward model learns the instruction too: it judges a world whose
    // prompts may ask for quotes (a reward model that never saw one ranks a quoted answer at
    // random, and RPO then fits those gaps against the checker's verdict).
    let rm_prompts: Vec<String> = train_prompts
        .iter()
        .skip(b.seed_examples)
        .take(b.reward_examples)
        .enumerate()
        .map(|(i, p)| match quoted_seeds && i % RM_QUOTED_EVERY == 0 {
            true => quoted(&p.prompt),
            false => p.prompt.clone(),
        })
        .collect();
    let sampled = sample(
        &generator,
        &rm_prompts,
        1,
        &SampleConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_tokens: 16,
            seed,
            batch_size: 128,
        },
        &mut |_, _| true,
    )?;
    let mut data = Vec::new();
    for (p, s) in rm_prompts.iter().zip(sampled) {
        let good = world::answer(p).unwrap_or_default();
        let bad = corrupt(&good, &mut rng);
        // For a quoted prompt, the bare answer too: right words, instruction not followed.
        let bare = good.strip_prefix('"').and_then(|g| g.strip_suffix('"'));
        let bare = bare.filter(|_| world::Format::of(p).1 == world::Format::Quotes);
        let bare = bare.map(str::to_string);
        for response in [good, bad, s[0].clone()].into_iter().chain(bare) {
            let labels = reward::labels(p, &response);
            data.push((p.clone(), response, labels));
        }
    }
    let varmap = VarMap::new();
    let rm = checkpoint::load_trainable(&base_dir, config.with_reward_head(), &varmap, &dev)?;
    let cfg = TrainConfig {
        steps: b.reward_steps,
        lr: 2e-3,
        seed: seed + 2,
        ..TrainConfig::default()
    };
    train::reward_model(&rm, &varmap, &data, &cfg, &mut |_, _| true)?;
    let reward_dir = dir.join("reward");
    save_checkpoint(&reward_dir, &rm.config, &varmap)?;
    Ok(Models {
        base: base_dir,
        generator: generator_dir,
        reward: reward_dir,
        generator_accuracy,
    })
}
