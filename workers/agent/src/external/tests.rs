use super::*;

fn values() -> BTreeMap<String, String> {
    [
        ("base_model", "/m/base"),
        ("ref_model", "/m/ref"),
        ("sft_data", "/d/sft/train.jsonl"),
        ("sft_dir", "/d/sft"),
        ("pairs_data", "/d/pairs/train.jsonl"),
        ("pairs_dir", "/d/pairs"),
        ("output_dir", "/out"),
        ("lr", "1e-6"),
        ("epochs", "2"),
        ("batch_size", "16"),
        ("beta", "0.1"),
        ("eta", "1.0"),
        ("gpus", "8"),
        ("nodes", "1"),
        ("steps", "50"),
        ("seed", "3"),
        ("algorithm", "rpo"),
        ("preference_loss", "rpo_bwd_kl"),
        ("flywheel", "/bin/flywheel"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn line(name: &str, sft: bool) -> String {
    let t = template(name).unwrap();
    let args: Vec<String> = (if sft { t.sft } else { t.preference })
        .iter()
        .map(|s| s.to_string())
        .collect();
    render(&args, &values()).unwrap().join(" ")
}

#[test]
fn templates_render_each_trainers_documented_arguments() {
    // TRL CLI (`trl sft|dpo`, TrlParser over SFTConfig / DPOConfig / ModelConfig).
    assert_eq!(
        line("trl", true),
        "trl sft --model_name_or_path /m/base --dataset_name /d/sft --output_dir /out --learning_rate 1e-6 --num_train_epochs 2 --per_device_train_batch_size 16 --logging_steps 1 --report_to none"
    );
    assert_eq!(
        line("trl", false),
        "trl dpo --model_name_or_path /m/base --dataset_name /d/pairs --output_dir /out --learning_rate 1e-6 --num_train_epochs 2 --per_device_train_batch_size 16 --beta 0.1 --logging_steps 1 --report_to none"
    );
    // NeMo-Aligner Hydra overrides (docs/user-guide/dpo.rst, conf/gpt_sft.yaml, gpt_dpo.yaml).
    assert_eq!(
        line("nemo_aligner", true),
        "python /opt/NeMo-Aligner/examples/nlp/gpt/train_gpt_sft.py trainer.num_nodes=1 trainer.devices=8 model.restore_from_path=/m/base model.data.chat=True model.data.train_ds.file_path=/d/sft/train.jsonl model.data.validation_ds.file_path=/d/sft/train.jsonl model.optim.lr=1e-6 trainer.sft.max_epochs=2 model.global_batch_size=16 exp_manager.explicit_log_dir=/out"
    );
    assert_eq!(
        line("nemo_aligner", false),
        "python /opt/NeMo-Aligner/examples/nlp/gpt/train_gpt_dpo.py trainer.num_nodes=1 trainer.devices=8 pretrained_checkpoint.restore_from_path=/m/base model.data.data_prefix={train: [/d/pairs/train.jsonl], validation: [/d/pairs/train.jsonl], test: [/d/pairs/train.jsonl]} ++trainer.dpo.max_epochs=2 ++model.global_batch_size=16 ++model.optim.lr=1e-6 ++model.dpo.ref_policy_kl_penalty=0.1 ++model.dpo.preference_loss=rpo_bwd_kl ++model.dpo.gt_reward_scale=1.0 exp_manager.explicit_log_dir=/out"
    );
    // OpenRLHF CLI (openrlhf.cli.train_sft / train_dpo argparse flags).
    assert_eq!(
        line("openrlhf", true),
        "deepspeed --module openrlhf.cli.train_sft --pretrain /m/base --dataset /d/sft/train.jsonl --input_key messages --apply_chat_template --save_path /out --learning_rate 1e-6 --max_epochs 2 --train_batch_size 16"
    );
    assert_eq!(
        line("openrlhf", false),
        "deepspeed --module openrlhf.cli.train_dpo --pretrain /m/base --ref_pretrain /m/ref --dataset /d/pairs/train.jsonl --prompt_key prompt --chosen_key chosen --rejected_key rejected --apply_chat_template --beta 0.1 --save_path /out --learning_rate 1e-6 --max_epochs 2 --train_batch_size 16"
    );
    assert_eq!(
        line("flywheel", false),
        "/bin/flywheel train rpo --model /m/base --reference /m/ref --data /d/pairs/train.jsonl --output /out --lr 1e-6 --steps 50 --batch-size 16 --beta 0.1 --eta 1.0 --seed 3"
    );
    let err = render(&["{nope}".to_string()], &values()).unwrap_err();
    assert_eq!(err, "placeholder {nope} has no value");
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort();
    k
}

#[test]
fn exported_datasets_have_exactly_the_fields_each_trainer_reads() {
    let sft = [json!({ "messages": [
        { "role": "user", "content": "2+2?" }, { "role": "assistant", "content": "4" }
    ], "reward": 3.0 })];
    let pair = [json!({ "prompt": "2+2?", "chosen": "4", "rejected": "5",
        "chosen_reward": 3.5, "rejected_reward": 0.5, "judge": "rm" })];
    // TRL SFTTrainer conversational LM; OpenRLHF --input_key messages.
    let m = &export_sft(&sft, SftFormat::Messages)[0];
    assert_eq!(keys(m), ["messages"]);
    // NeMo-Aligner chat SFT (dummy-sft.jsonl shape).
    let n = &export_sft(&sft, SftFormat::NemoChat)[0];
    assert_eq!(keys(n), ["conversations", "mask", "system"]);
    assert_eq!(
        n["conversations"][1],
        json!({ "from": "Assistant", "value": "4" })
    );
    // TRL DPOTrainer conversational preference; OpenRLHF with --prompt_key prompt.
    let c = &export_pairs(&pair, PairFormat::Conversational)[0];
    assert_eq!(keys(c), ["chosen", "prompt", "rejected"]);
    assert_eq!(
        c["chosen"],
        json!([{ "role": "assistant", "content": "4" }])
    );
    // NeMo-Aligner DPOModelDataset, rewards for RPO.
    let na = &export_pairs(&pair, PairFormat::NemoAligner)[0];
    assert_eq!(
        keys(na),
        [
            "chosen_response",
            "chosen_reward",
            "prompt",
            "rejected_response",
            "rejected_reward"
        ]
    );
    assert_eq!(
        na["prompt"],
        "<extra_id_0>System\n\n<extra_id_1>User\n2+2?\n<extra_id_1>Assistant\n"
    );
    assert_eq!(na["chosen_response"], "4\n<extra_id_1>");
    let p = &export_pairs(&pair, PairFormat::Plain)[0];
    assert_eq!(
        keys(p),
        [
            "chosen",
            "chosen_reward",
            "prompt",
            "rejected",
            "rejected_reward"
        ]
    );
}

#[test]
fn log_lines_become_metrics() {
    assert_eq!(
        parse_metrics("{'loss': 1.25, 'grad_norm': 3.0, 'learning_rate': 1e-05, 'epoch': 0.5}"),
        [
            ("loss".to_string(), 1.25),
            ("grad_norm".to_string(), 3.0),
            ("learning_rate".to_string(), 1e-5),
            ("epoch".to_string(), 0.5)
        ]
    );
    assert_eq!(
        parse_metrics("step=3 loss=0.5 note=fine"),
        [("step".to_string(), 3.0), ("loss".to_string(), 0.5)]
    );
    assert!(parse_metrics("Epoch 1/3: training").is_empty());
}

#[test]
fn extra_args_follow_the_rendered_template() {
    let v = values();
    let params: ExternalTrain = serde_json::from_value(json!({ "template": "trl", "extra_args": ["--use_cpu", true, "--bf16", "false", "--output_dir", "{output_dir}"] })).unwrap();
    let mut argv = render(
        &template("trl")
            .unwrap()
            .sft
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
        &v,
    )
    .unwrap();
    argv.extend(extra_args(&params, &v).unwrap());
    let line = argv.join(" ");
    assert!(
        line.ends_with("--use_cpu true --bf16 false --output_dir /out"),
        "{line}"
    );
    assert!(line.starts_with("trl sft"), "{line}");
    let both: ExternalTrain =
        serde_json::from_value(json!({ "command": ["x"], "extra_args": ["y"] })).unwrap();
    assert!(extra_args(&both, &v).is_err());
    assert!(
        extra_args(&ExternalTrain::default(), &v)
            .unwrap()
            .is_empty()
    );
}

/// Lines as TRL 1.16 on transformers 5 prints them (`trl sft ... --use_cpu true`): quoted
/// numbers in the logged dicts, tqdm bars redrawn with `\r`, and warnings with paths.
#[test]
fn real_trl_log_lines_become_the_right_metrics_and_progress() {
    let logged = "{'loss': '6.243', 'grad_norm': '12.51', 'learning_rate': '4.5e-05', 'num_tokens': '2048.0', 'mean_token_accuracy': '0.03125', 'epoch': '0.5'}";
    assert_eq!(
        parse_metrics(logged),
        [
            ("loss".to_string(), 6.243),
            ("grad_norm".to_string(), 12.51),
            ("learning_rate".to_string(), 4.5e-5),
            ("num_tokens".to_string(), 2048.0),
            ("mean_token_accuracy".to_string(), 0.03125),
            ("epoch".to_string(), 0.5)
        ]
    );
    let summary = "{'train_runtime': '6.104', 'train_samples_per_second': '3.277', 'train_steps_per_second': '1.638', 'train_loss': '5.912', 'epoch': '1.0'}";
    assert_eq!(parse_metrics(summary).len(), 5);
    for noise in [
        "/usr/local/lib/python3.11/site-packages/trl/scripts/sft.py:1541: UserWarning: You passed a tokenizer with padding_side not equal to right",
        "  warnings.warn(",
        "[2026-11-30 10:02:11,402] [INFO] [real_accelerator.py:203:get_accelerator] Setting ds_accelerator to cpu (auto detect)",
        "Map: 100%|██████████| 64/64 [00:00<00:00, 3210.55 examples/s]",
    ] {
        assert!(
            parse_metrics(noise).is_empty(),
            "{noise}: {:?}",
            parse_metrics(noise)
        );
    }
    let bar =
        "  0%|          | 0/10 [00:00<?, ?it/s]\r 50%|█████     | 5/10 [00:03<00:03,  1.52it/s]";
    assert_eq!(parse_progress(bar), Some(0.5));
    assert!(parse_metrics(bar).is_empty());
    assert_eq!(parse_progress(logged), None);
    // NeMo/Lightning bars carry metrics as key=value.
    assert_eq!(
        parse_metrics(
            "Epoch 0: 100%|██████████| 10/10 [00:05<00:00, train_loss=0.693, lr=1e-06, v_num=0]"
        ),
        [
            ("train_loss".to_string(), 0.693),
            ("lr".to_string(), 1e-6),
            ("v_num".to_string(), 0.0)
        ]
    );
}
