//! Probe: held-out accuracy after SFT on N ground-truth examples, for sizing the demo.
use candle_nn::VarMap;
use flywheel_engine::eval;
use flywheel_engine::model::{ModelConfig, Transformer};
use flywheel_engine::tasks::{self, Mix, Split};
use flywheel_engine::train::{self, TrainConfig};
use std::collections::HashSet;
fn main() {
    let dev = candle_core::Device::Cpu;
    let mix = |split| Mix {
        subtopics: ["add", "upper", "reverse", "count"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        max_difficulty: 1,
        brackets: 0.2,
        split,
    };
    let held: Vec<String> = tasks::generate(1234, 200, &mix(Split::HeldOut), "e", &HashSet::new())
        .into_iter()
        .map(|p| p.prompt)
        .collect();
    for (n, steps, d, layers) in [
        (1000usize, 600usize, 96usize, 2usize),
        (1000, 1200, 96, 2),
        (1000, 600, 128, 2),
    ] {
        let data: Vec<(String, String)> =
            tasks::generate(5, n, &mix(Split::Train), "t", &HashSet::new())
                .into_iter()
                .map(|p| {
                    let a = tasks::answer(&p.prompt).unwrap();
                    (p.prompt, a)
                })
                .collect();
        let varmap = VarMap::new();
        let cfg = ModelConfig {
            d_model: d,
            n_layers: layers,
            d_ff: d * 8 / 3,
            ..ModelConfig::small()
        };
        let m = Transformer::fresh(cfg, &varmap, &dev).unwrap();
        let t = std::time::Instant::now();
        train::sft(
            &m,
            &varmap,
            &data,
            &TrainConfig {
                steps,
                lr: 3e-3,
                ..TrainConfig::default()
            },
            &mut |_, _| true,
        )
        .unwrap();
        let acc = eval::accuracy(&held, &eval::answers(&m, &held).unwrap());
        println!(
            "n={n} steps={steps} d={d} layers={layers}: acc {acc:.3} in {:.1}s",
            t.elapsed().as_secs_f64()
        );
    }
}
