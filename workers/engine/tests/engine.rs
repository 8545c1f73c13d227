//! The engine's behaviour: loss math, gradient flow, checkpoints, sampling, learning.

use flywheel_proto::stage::HELPSTEER2_WEIGHTS;
use std::collections::HashSet;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use flywheel_engine::model::{ModelConfig, Transformer};
use flywheel_engine::rng::Rng;
use flywheel_engine::sample::{SampleConfig, sample};
use flywheel_engine::train::{self, TrainConfig};
use flywheel_engine::world::{self, Mix};
use flywheel_engine::{checkpoint, eval, reward};

fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn scalar(x: Tensor) -> f64 {
    x.to_scalar::<f32>().unwrap() as f64
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[test]
fn dpo_and_rpo_losses_match_hand_computation() {
    let (pc, pr, rc, rr) = (
        [-3.0f32, -5.0],
        [-4.0f32, -4.5],
        [-3.5f32, -5.0],
        [-3.8f32, -4.0],
    );
    let beta = 0.5;
    let deltas: Vec<f64> = (0..2)
        .map(|i| (pc[i] - rc[i]) as f64 - (pr[i] - rr[i]) as f64)
        .collect();
    let want_dpo = deltas.iter().map(|d| -sigmoid(beta * d).ln()).sum::<f64>() / 2.0;
    let got = scalar(train::dpo_loss(&t(&pc), &t(&pr), &t(&rc), &t(&rr), beta).unwrap());
    assert!((got - want_dpo).abs() < 1e-5, "{got} vs {want_dpo}");

    let (wc, wr, eta) = ([3.0f32, 1.0], [1.0f32, 2.0], 1.0);
    let want_rpo = (0..2)
        .map(|i| {
            let a = beta * deltas[i];
            let b = eta * (wc[i] - wr[i]) as f64;
            let (sa, sb) = (sigmoid(a), sigmoid(b));
            sb * (sb / sa).ln() + (1.0 - sb) * ((1.0 - sb) / (1.0 - sa)).ln()
        })
        .sum::<f64>()
        / 2.0;
    let got = scalar(
        train::rpo_loss(
            &t(&pc),
            &t(&pr),
            &t(&rc),
            &t(&rr),
            &t(&wc),
            &t(&wr),
            beta,
            eta,
        )
        .unwrap(),
    );
    assert!((got - want_rpo).abs() < 1e-5, "{got} vs {want_rpo}");
    // RPO is zero when the implicit reward gap already equals the scaled reward gap.
    let zero = train::rpo_loss(
        &t(&[0.0]),
        &t(&[0.0]),
        &t(&[0.0]),
        &t(&[0.0]),
        &t(&[1.0]),
        &t(&[1.0]),
        beta,
        eta,
    )
    .unwrap();
    assert!(scalar(zero).abs() < 1e-6);
}

#[test]
fn sft_loss_counts_response_tokens_only() {
    let dev = Device::Cpu;
    let b = train::batch(&[("ab", "c")], 64, &dev).unwrap();
    // <user> a b <assistant> c <end>: targets c and <end> are the response.
    let mask: Vec<Vec<f32>> = b.mask.to_vec2().unwrap();
    assert_eq!(mask[0], vec![0.0, 0.0, 0.0, 1.0, 1.0, 0.0]);
    let logp = Tensor::new(&[[-9.0f32, -9.0, -9.0, -1.0, -3.0, -9.0]], &dev).unwrap();
    assert!((scalar(train::sft_loss(&logp, &b.mask).unwrap()) - 2.0).abs() < 1e-6);
    let seq = train::sequence_logprob(&logp, &b.mask)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(seq, vec![-4.0]);
}

fn all_vars_get_gradients(varmap: &VarMap, loss: &Tensor) {
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    for (name, var) in data.iter() {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name} received no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{name} has a zero gradient");
    }
}

#[test]
fn every_trainable_parameter_receives_a_gradient() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = Transformer::fresh(ModelConfig::tiny(), &varmap, &dev, 1).unwrap();
    let b = train::batch(&[("add 1 2", "3"), ("reverse abc", "cba")], 64, &dev).unwrap();
    let loss = train::sft_loss(&train::token_logprobs(&model, &b).unwrap(), &b.mask).unwrap();
    all_vars_get_gradients(&varmap, &loss);

    let varmap = VarMap::new();
    let rm = Transformer::fresh(ModelConfig::tiny().with_reward_head(), &varmap, &dev, 1).unwrap();
    let pred = rm.attributes(&b.inputs, &b.last).unwrap();
    let loss = pred.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let untouched: Vec<_> = data
        .iter()
        .filter(|(_, v)| grads.get(v).is_none())
        .map(|(n, _)| n.clone())
        .collect();
    // The reward loss reads no logits, so only the LM head is out of its graph.
    assert_eq!(untouched, vec!["lm_head".to_string()]);
}

#[test]
fn checkpoints_round_trip_exactly_and_refuse_the_wrong_shape() {
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("fw-ckpt-{}", std::process::id()));
    let varmap = VarMap::new();
    let model = Transformer::fresh(ModelConfig::tiny(), &varmap, &dev, 1).unwrap();
    checkpoint::save(&dir, &model.config, &varmap).unwrap();
    let loaded = checkpoint::load_frozen(&dir, &dev).unwrap();
    let b = train::batch(&[("sort cab", "abc")], 64, &dev).unwrap();
    let a: Vec<Vec<Vec<f32>>> = model.logits(&b.inputs).unwrap().to_vec3().unwrap();
    let c: Vec<Vec<Vec<f32>>> = loaded.logits(&b.inputs).unwrap().to_vec3().unwrap();
    assert_eq!(a, c);

    let bigger = ModelConfig {
        d_model: 64,
        ..ModelConfig::tiny()
    };
    let err = checkpoint::load_trainable(&dir, bigger, &VarMap::new(), &dev)
        .err()
        .expect("shape mismatch");
    assert!(err.to_string().contains("has shape"), "{err}");
    // Adding a reward head to a trained trunk is allowed.
    let with_head = ModelConfig::tiny().with_reward_head();
    assert!(checkpoint::load_trainable(&dir, with_head, &VarMap::new(), &dev).is_ok());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sampling_is_reproducible_and_the_kv_cache_matches_a_full_forward() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = Transformer::fresh(ModelConfig::tiny(), &varmap, &dev, 1).unwrap();
    let prompts: Vec<String> = vec!["add 1 2".into(), "upper abcdef".into(), "x".into()];
    let cfg = SampleConfig {
        temperature: 1.0,
        top_k: 50,
        top_p: 0.95,
        max_tokens: 12,
        seed: 42,
        batch_size: 4,
    };
    let a = sample(&model, &prompts, 3, &cfg, &mut |_, _| true).unwrap();
    let b = sample(&model, &prompts, 3, &cfg, &mut |_, _| true).unwrap();
    assert_eq!(a, b);
    let c = sample(
        &model,
        &prompts,
        3,
        &SampleConfig {
            seed: 43,
            ..cfg.clone()
        },
        &mut |_, _| true,
    )
    .unwrap();
    assert_ne!(a, c);

    // Greedy decoding with the cache (left-padded batch) equals step-by-step full forwards.
    let greedy = sample(
        &model,
        &prompts,
        1,
        &SampleConfig::greedy(6),
        &mut |_, _| true,
    )
    .unwrap();
    for (p, got) in prompts.iter().zip(&greedy) {
        let mut ids = flywheel_engine::tokenizer::encode_prompt(p);
        let mut out = Vec::new();
        for _ in 0..6 {
            let x = Tensor::new(ids.as_slice(), &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits: Vec<Vec<Vec<f32>>> = model.logits(&x).unwrap().to_vec3().unwrap();
            let last = logits[0].last().unwrap();
            let next = last
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32;
            out.push(next);
            if next == flywheel_engine::tokenizer::END {
                break;
            }
            ids.push(next);
        }
        assert_eq!(
            got[0],
            flywheel_engine::tokenizer::decode(&out),
            "prompt {p:?}"
        );
    }
}

fn corrupt(answer: &str, rng: &mut Rng) -> String {
    let mut c: Vec<char> = answer.chars().collect();
    let i = rng.below(c.len() as u64) as usize;
    c[i] = if c[i].is_ascii_digit() {
        char::from(b'0' + ((c[i] as u8 - b'0' + 1 + rng.below(8) as u8) % 10))
    } else {
        'z'
    };
    c.into_iter().collect()
}

#[test]
fn the_reward_head_separates_correct_from_wrong_answers() {
    let dev = Device::Cpu;
    let mix = Mix {
        subtopics: vec!["upper".into(), "reverse".into()],
        max_difficulty: 1,
        brackets: 0.0,
        quotes: 0.0,
        split: world::Split::Any,
    };
    let train_prompts = world::generate(1, 400, &mix, "t", &HashSet::new());
    let seen: HashSet<String> = train_prompts.iter().map(|p| p.prompt.clone()).collect();
    let held_out = world::generate(2, 60, &mix, "h", &seen);
    let mut rng = Rng::new(3);
    let mut data = Vec::new();
    for p in &train_prompts {
        let good = world::answer(&p.prompt).unwrap();
        let bad = corrupt(&good, &mut rng);
        data.push((
            p.prompt.clone(),
            good.clone(),
            reward::labels(&p.prompt, &good),
        ));
        data.push((
            p.prompt.clone(),
            bad.clone(),
            reward::labels(&p.prompt, &bad),
        ));
    }
    let varmap = VarMap::new();
    let rm = Transformer::fresh(ModelConfig::tiny().with_reward_head(), &varmap, &dev, 1).unwrap();
    let cfg = TrainConfig {
        steps: 400,
        batch_size: 32,
        lr: 3e-3,
        warmup: 20,
        ..Default::default()
    };
    train::reward_model(&rm, &varmap, &data, &cfg, &mut |_, _| true).unwrap();
    let mut rows = Vec::new();
    for p in &held_out {
        let good = world::answer(&p.prompt).unwrap();
        rows.push((p.prompt.clone(), good.clone(), true));
        rows.push((p.prompt.clone(), corrupt(&good, &mut rng), false));
    }
    let pairs: Vec<(&str, &str)> = rows
        .iter()
        .map(|(p, r, _)| (p.as_str(), r.as_str()))
        .collect();
    let scores = reward::score(&rm, &pairs, 64).unwrap();
    let ranked_right = rows
        .chunks(2)
        .zip(scores.chunks(2))
        .filter(|(_, s)| {
            reward::scalar(&s[0], &HELPSTEER2_WEIGHTS) > reward::scalar(&s[1], &HELPSTEER2_WEIGHTS)
        })
        .count();
    let frac = ranked_right as f64 / held_out.len() as f64;
    assert!(
        frac >= 0.8,
        "the reward model preferred the correct answer on only {frac:.2} of held-out prompts"
    );
}

#[test]
fn a_small_sft_run_raises_held_out_accuracy() {
    let dev = Device::Cpu;
    let mix = Mix {
        subtopics: vec!["upper".into(), "reverse".into(), "add".into()],
        max_difficulty: 1,
        brackets: 0.2,
        quotes: 0.0,
        split: world::Split::Any,
    };
    let train_prompts = world::generate(10, 600, &mix, "t", &HashSet::new());
    let seen: HashSet<String> = train_prompts.iter().map(|p| p.prompt.clone()).collect();
    let held_out: Vec<String> = world::generate(11, 80, &mix, "h", &seen)
        .into_iter()
        .map(|p| p.prompt)
        .collect();
    let data: Vec<(String, String)> = train_prompts
        .iter()
        .map(|p| (p.prompt.clone(), world::answer(&p.prompt).unwrap()))
        .collect();
    let varmap = VarMap::new();
    let config = ModelConfig {
        d_model: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        d_ff: 128,
        ..ModelConfig::tiny()
    };
    let model = Transformer::fresh(config, &varmap, &dev, 1).unwrap();
    let before = eval::accuracy(&held_out, &eval::answers(&model, &held_out).unwrap());
    let cfg = TrainConfig {
        steps: 500,
        batch_size: 32,
        lr: 5e-3,
        warmup: 20,
        ..Default::default()
    };
    train::sft(&model, &varmap, &data, &cfg, &mut |_, _| true).unwrap();
    let after = eval::accuracy(&held_out, &eval::answers(&model, &held_out).unwrap());
    assert!(
        after >= before + 0.4,
        "held-out accuracy {before:.2} -> {after:.2}"
    );
}

/// The answer a quoted prompt asks for is labelled as coherent and correct as a bare answer to a
/// bare prompt; the bare answer to a quoted prompt is not correct (the instruction is part of it).
#[test]
fn labels_judge_a_quoted_answer_by_what_is_inside_the_quotes() {
    let bare = reward::labels("add 2 3", "5");
    let quoted = reward::labels("add 2 3 in quotes", "\"5\"");
    assert_eq!(quoted[2], 4.0, "coherence of the asked-for quoted answer");
    assert_eq!(quoted[2], bare[2]);
    assert_eq!(quoted[1], 4.0, "correctness");
    assert_eq!(reward::labels("add 2 3 in quotes", "5")[1], 0.0);
    assert!(
        reward::labels("add 2 3", "\"5")[2] < 4.0,
        "an unbalanced quote is ill-formed"
    );
}
