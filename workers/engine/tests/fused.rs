//! The fused CPU step computes what the candle graph computes: the same loss and, for every
//! variable, the same gradient within float rounding, for each objective; and the gradient
//! reaches every parameter.

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use flywheel_engine::fused::{self, HostModel, Objective, Seq};
use flywheel_engine::model::{ModelConfig, Transformer};
use flywheel_engine::train::{self, PreferenceLoss, PreferenceObjective};

/// Rows of different lengths, one cut at the context (its response runs past `max_seq`).
fn rows(max_seq: usize) -> Vec<(String, String)> {
    vec![
        ("add 3 and 4".into(), "7".into()),
        ("reverse abc".into(), "cba".into()),
        ("what is 12 times 11?".into(), "132".into()),
        ("x".into(), "y".repeat(max_seq)),
        ("spell [b] please".into(), "[b]".into()),
        ("sum 1 2 3 4 5".into(), "15".into()),
    ]
}

fn seqs(rows: &[(&str, &str)], max_seq: usize) -> Vec<Seq> {
    rows.iter().map(|(p, r)| Seq::new(p, r, max_seq)).collect()
}

/// Compares candle's gradient of `loss` with the fused `grads` for every variable of `varmap`
/// but those in `unused` (which the loss does not read).
fn assert_same_grads(
    varmap: &VarMap,
    host: &HostModel,
    loss: &Tensor,
    grads: &[f32],
    unused: &[&str],
) {
    let candle = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    assert_eq!(data.len(), host.names().len(), "every variable is covered");
    for (name, var) in data.iter().filter(|(n, _)| !unused.contains(&n.as_str())) {
        let theirs: Vec<f32> = candle
            .get(Var::as_tensor(var))
            .map(|g| g.flatten_all().unwrap().to_vec1().unwrap())
            .unwrap_or_else(|| vec![0.0; var.elem_count()]);
        let ours = host.grad_of(name, grads).unwrap();
        let scale = theirs.iter().fold(0f32, |m, g| m.max(g.abs()));
        let worst = ours
            .iter()
            .zip(&theirs)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 1e-3 * scale + 1e-6,
            "{name}: fused and candle gradients differ by {worst} (largest candle entry {scale})"
        );
        assert!(
            ours.iter().any(|g| *g != 0.0),
            "{name}: the gradient does not reach it"
        );
    }
}

fn close(a: f64, b: f64) {
    assert!(
        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
        "losses differ: fused {a}, candle {b}"
    );
}

fn configs() -> [ModelConfig; 2] {
    [ModelConfig::tiny(), ModelConfig::small()]
}

#[test]
fn sft_loss_and_gradients_equal_the_candle_graph() {
    let dev = Device::Cpu;
    for config in configs() {
        let varmap = VarMap::new();
        let model = Transformer::fresh(config.clone(), &varmap, &dev, 3).unwrap();
        let data = rows(config.max_seq);
        let rows: Vec<(&str, &str)> = data.iter().map(|(p, r)| (p.as_str(), r.as_str())).collect();
        let host = HostModel::of(&model).unwrap();
        for threads in [1, 2, 4] {
            let mut grads = vec![0f32; host.len()];
            let ours = fused::loss_and_grads(
                &host,
                &seqs(&rows, config.max_seq),
                &Objective::Sft,
                &mut grads,
                threads,
            )
            .unwrap();
            let b = train::batch(&rows, config.max_seq, &dev).unwrap();
            let loss = train::sft_batch_loss(&model, &b).unwrap();
            close(ours, loss.to_scalar::<f32>().unwrap() as f64);
            assert_same_grads(&varmap, &host, &loss, &grads, &[]);
        }
    }
}

#[test]
fn dpo_and_rpo_losses_and_gradients_equal_the_candle_graph() {
    let dev = Device::Cpu;
    for config in configs() {
        let varmap = VarMap::new();
        let policy = Transformer::fresh(config.clone(), &varmap, &dev, 3).unwrap();
        let reference = Transformer::fresh(config.clone(), &VarMap::new(), &dev, 4).unwrap();
        let data = rows(config.max_seq);
        // Three pairs: chosen rows first, then the same prompts' rejected rows.
        let mut pairs: Vec<(&str, &str)> = data[..3]
            .iter()
            .map(|(p, r)| (p.as_str(), r.as_str()))
            .collect();
        let rejected: Vec<(String, String)> = data[..3]
            .iter()
            .map(|(p, r)| (p.clone(), format!("{r}x9")))
            .collect();
        pairs.extend(rejected.iter().map(|(p, r)| (p.as_str(), r.as_str())));
        let rewards = [(3.0, 1.0), (2.5, 2.0), (1.0, 4.0)];
        let (host, host_ref) = (
            HostModel::of(&policy).unwrap(),
            HostModel::of(&reference).unwrap(),
        );
        for loss_kind in [PreferenceLoss::Dpo, PreferenceLoss::Rpo { eta: 0.7 }] {
            for sft_weight in [0.0, 0.3] {
                let objective = PreferenceObjective {
                    loss: loss_kind,
                    beta: 0.5,
                    sft_weight,
                };
                let mut grads = vec![0f32; host.len()];
                let ours = fused::loss_and_grads(
                    &host,
                    &seqs(&pairs, config.max_seq),
                    &Objective::Preference {
                        reference: &host_ref,
                        objective,
                        rewards: &rewards,
                    },
                    &mut grads,
                    2,
                )
                .unwrap();
                let b = train::batch(&pairs, config.max_seq, &dev).unwrap();
                let loss =
                    train::preference_batch_loss(&policy, &reference, &b, objective, &rewards)
                        .unwrap();
                close(ours, loss.to_scalar::<f32>().unwrap() as f64);
                assert_same_grads(&varmap, &host, &loss, &grads, &[]);
            }
        }
    }
}

#[test]
fn reward_regression_loss_and_gradients_equal_the_candle_graph() {
    let dev = Device::Cpu;
    for config in configs() {
        let config = config.with_reward_head();
        let varmap = VarMap::new();
        let model = Transformer::fresh(config.clone(), &varmap, &dev, 5).unwrap();
        let data = rows(config.max_seq);
        let rows: Vec<(&str, &str)> = data.iter().map(|(p, r)| (p.as_str(), r.as_str())).collect();
        let labels: Vec<[f32; 5]> = (0..rows.len())
            .map(|i| std::array::from_fn(|a| (i + a) as f32 * 0.5))
            .collect();
        let host = HostModel::of(&model).unwrap();
        let mut grads = vec![0f32; host.len()];
        let ours = fused::loss_and_grads(
            &host,
            &seqs(&rows, config.max_seq),
            &Objective::Reward(&labels),
            &mut grads,
            2,
        )
        .unwrap();
        let b = train::batch(&rows, config.max_seq, &dev).unwrap();
        let flat: Vec<f32> = labels.iter().flatten().copied().collect();
        let labels = Tensor::from_vec(flat, (rows.len(), 5), &dev).unwrap();
        let pred = model.attributes(&b.inputs, &b.last).unwrap();
        let loss = (pred - labels).unwrap().sqr().unwrap().mean_all().unwrap();
        close(ours, loss.to_scalar::<f32>().unwrap() as f64);
        // The LM head plays no part in the reward loss; every other variable must match.
        assert_same_grads(&varmap, &host, &loss, &grads, &["lm_head"]);
    }
}

#[test]
fn fused_training_writes_the_trained_weights_back_and_lowers_the_loss() {
    let dev = Device::Cpu;
    let config = ModelConfig::tiny();
    let varmap = VarMap::new();
    let model = Transformer::fresh(config.clone(), &varmap, &dev, 1).unwrap();
    let data: Vec<(String, String)> = (0..20)
        .map(|i| (format!("add {i} and 1"), format!("{}", i + 1)))
        .collect();
    let cfg = train::TrainConfig {
        steps: 60,
        batch_size: 8,
        ..train::TrainConfig::default()
    };
    let rows: Vec<(&str, &str)> = data.iter().map(|(p, r)| (p.as_str(), r.as_str())).collect();
    let b = train::batch(&rows, config.max_seq, &dev).unwrap();
    let before = train::sft_batch_loss(&model, &b)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let mut losses = Vec::new();
    train::sft(&model, &varmap, &data, &cfg, &mut |_, l| {
        losses.push(l);
        true
    })
    .unwrap();
    // The candle model reads the variables the fused loop wrote back.
    let after = train::sft_batch_loss(&model, &b)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(after < before * 0.8, "loss {before} -> {after}");
    assert_eq!(losses.len(), 60);
    assert!(
        (losses[0] - before as f64).abs() < 0.5,
        "first step loss {}",
        losses[0]
    );
}

/// Sampling through the fused forward pass draws the same tokens as the candle graph's sampler
/// (greedy and at temperature 1 with the same generators), for rows of different lengths and
/// budgets in one batch; the reward model scores the same attributes.
#[test]
fn fused_sampling_and_scoring_equal_the_candle_graph() {
    use flywheel_engine::reward;
    use flywheel_engine::sample::{Row, SampleConfig, sample_rows, sample_rows_on_graph};
    let dev = Device::Cpu;
    let config = ModelConfig::small();
    let varmap = VarMap::new();
    let model = Transformer::fresh(config.clone(), &varmap, &dev, 9).unwrap();
    let prompts = [
        "add 3 and 4",
        "reverse the word abcdef please",
        "x",
        "what is 12 times 11? answer in brackets",
    ];
    let configs = [
        SampleConfig::greedy(12),
        SampleConfig {
            temperature: 1.0,
            top_k: 40,
            top_p: 0.95,
            max_tokens: 20,
            seed: 3,
            batch_size: 8,
        },
        SampleConfig::greedy(3),
    ];
    let rows_of = || -> Vec<Row<'_>> {
        prompts
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                configs.iter().enumerate().map(move |(j, cfg)| Row {
                    prompt: p,
                    cfg,
                    rng: Row::rng_of(cfg.seed, i, j),
                })
            })
            .collect()
    };
    let ours = sample_rows(&model, &mut rows_of()).unwrap();
    let theirs = sample_rows_on_graph(&model, &mut rows_of()).unwrap();
    assert_eq!(ours, theirs);
    assert!(ours.iter().all(|g| !g.is_empty()));
    assert!(
        ours.iter().any(|g| g.len() > 3),
        "rows ran to different lengths"
    );

    let rm = Transformer::fresh(config.with_reward_head(), &VarMap::new(), &dev, 2).unwrap();
    let rows: Vec<(&str, &str)> = prompts.iter().map(|p| (*p, "the answer")).collect();
    let ours = reward::score(&rm, &rows, 3).unwrap();
    let b = train::batch(&rows, rm.config.max_seq, &dev).unwrap();
    let theirs: Vec<Vec<f32>> = rm
        .attributes(&b.inputs, &b.last)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (o, t) in ours.iter().zip(&theirs) {
        for (a, b) in o.iter().zip(t) {
            assert!((a - b).abs() < 1e-4, "attribute {a} vs {b}");
        }
    }
}

/// A checkpoint whose vocabulary is smaller than the tokenizer's is refused with an error (the
/// fused pass indexes the embedding by token id), not a panic.
#[test]
fn a_vocabulary_smaller_than_the_tokenizers_is_refused() {
    let config = ModelConfig {
        vocab: 100,
        ..ModelConfig::tiny()
    };
    let model = Transformer::fresh(config, &VarMap::new(), &Device::Cpu, 1).unwrap();
    let err = HostModel::of(&model).unwrap_err().to_string();
    assert!(err.contains("vocab 100"), "{err}");
    let err = flywheel_engine::sample::sample(
        &model,
        &["add 1 2".to_string()],
        1,
        &flywheel_engine::sample::SampleConfig::greedy(4),
        &mut |_, _| true,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("smaller than the tokenizer"), "{err}");
}
