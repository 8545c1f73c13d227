//! The trainers' command templates and the placeholder renderer.

use std::collections::BTreeMap;

use super::export::{PairFormat, SftFormat};

/// A trainer's command lines and dataset formats.
pub struct Template {
    pub name: &'static str,
    pub sft: &'static [&'static str],
    pub preference: &'static [&'static str],
    pub sft_format: SftFormat,
    pub pair_format: PairFormat,
    /// Whether the trainer implements reward-aware RPO (NeMo-Aligner's `rpo_bwd_kl`).
    pub rpo: bool,
}

pub const TEMPLATES: [Template; 4] = [
    Template {
        name: "trl",
        sft: &[
            "trl",
            "sft",
            "--model_name_or_path",
            "{base_model}",
            "--dataset_name",
            "{sft_dir}",
            "--output_dir",
            "{output_dir}",
            "--learning_rate",
            "{lr}",
            "--num_train_epochs",
            "{epochs}",
            "--per_device_train_batch_size",
            "{batch_size}",
            "--logging_steps",
            "1",
            "--report_to",
            "none",
        ],
        preference: &[
            "trl",
            "dpo",
            "--model_name_or_path",
            "{base_model}",
            "--dataset_name",
            "{pairs_dir}",
            "--output_dir",
            "{output_dir}",
            "--learning_rate",
            "{lr}",
            "--num_train_epochs",
            "{epochs}",
            "--per_device_train_batch_size",
            "{batch_size}",
            "--beta",
            "{beta}",
            "--logging_steps",
            "1",
            "--report_to",
            "none",
        ],
        sft_format: SftFormat::Messages,
        pair_format: PairFormat::Conversational,
        rpo: false,
    },
    Template {
        name: "nemo_aligner",
        sft: &[
            "python",
            "/opt/NeMo-Aligner/examples/nlp/gpt/train_gpt_sft.py",
            "trainer.num_nodes={nodes}",
            "trainer.devices={gpus}",
            "model.restore_from_path={base_model}",
            "model.data.chat=True",
            "model.data.train_ds.file_path={sft_data}",
            "model.data.validation_ds.file_path={sft_data}",
            "model.optim.lr={lr}",
            "trainer.sft.max_epochs={epochs}",
            "model.global_batch_size={batch_size}",
            "exp_manager.explicit_log_dir={output_dir}",
        ],
        preference: &[
            "python",
            "/opt/NeMo-Aligner/examples/nlp/gpt/train_gpt_dpo.py",
            "trainer.num_nodes={nodes}",
            "trainer.devices={gpus}",
            "pretrained_checkpoint.restore_from_path={base_model}",
            "model.data.data_prefix={train: [{pairs_data}], validation: [{pairs_data}], test: [{pairs_data}]}",
            "++trainer.dpo.max_epochs={epochs}",
            "++model.global_batch_size={batch_size}",
            "++model.optim.lr={lr}",
            "++model.dpo.ref_policy_kl_penalty={beta}",
            "++model.dpo.preference_loss={preference_loss}",
            "++model.dpo.gt_reward_scale={eta}",
            "exp_manager.explicit_log_dir={output_dir}",
        ],
        sft_format: SftFormat::NemoChat,
        pair_format: PairFormat::NemoAligner,
        rpo: true,
    },
    Template {
        name: "openrlhf",
        sft: &[
            "deepspeed",
            "--module",
            "openrlhf.cli.train_sft",
            "--pretrain",
            "{base_model}",
            "--dataset",
            "{sft_data}",
            "--input_key",
            "messages",
            "--apply_chat_template",
            "--save_path",
            "{output_dir}",
            "--learning_rate",
            "{lr}",
            "--max_epochs",
            "{epochs}",
            "--train_batch_size",
            "{batch_size}",
        ],
        preference: &[
            "deepspeed",
            "--module",
            "openrlhf.cli.train_dpo",
            "--pretrain",
            "{base_model}",
            "--ref_pretrain",
            "{ref_model}",
            "--dataset",
            "{pairs_data}",
            "--prompt_key",
            "prompt",
            "--chosen_key",
            "chosen",
            "--rejected_key",
            "rejected",
            "--apply_chat_template",
            "--beta",
            "{beta}",
            "--save_path",
            "{output_dir}",
            "--learning_rate",
            "{lr}",
            "--max_epochs",
            "{epochs}",
            "--train_batch_size",
            "{batch_size}",
        ],
        sft_format: SftFormat::Messages,
        pair_format: PairFormat::Conversational,
        rpo: false,
    },
    Template {
        name: "flywheel",
        sft: &[
            "{flywheel}",
            "train",
            "sft",
            "--model",
            "{base_model}",
            "--data",
            "{sft_data}",
            "--output",
            "{output_dir}",
            "--lr",
            "{lr}",
            "--steps",
            "{steps}",
            "--batch-size",
            "{batch_size}",
            "--seed",
            "{seed}",
        ],
        preference: &[
            "{flywheel}",
            "train",
            "{algorithm}",
            "--model",
            "{base_model}",
            "--reference",
            "{ref_model}",
            "--data",
            "{pairs_data}",
            "--output",
            "{output_dir}",
            "--lr",
            "{lr}",
            "--steps",
            "{steps}",
            "--batch-size",
            "{batch_size}",
            "--beta",
            "{beta}",
            "--eta",
            "{eta}",
            "--seed",
            "{seed}",
        ],
        sft_format: SftFormat::Messages,
        pair_format: PairFormat::Plain,
        rpo: true,
    },
];

pub fn template(name: &str) -> Option<&'static Template> {
    TEMPLATES.iter().find(|t| t.name == name)
}

/// Fills `{name}` placeholders; braces around anything that is not a known-style name (such as
/// Hydra's `{train: [...]}`) are left alone. An unknown placeholder is an error naming it.
pub fn render(args: &[String], values: &BTreeMap<String, String>) -> Result<Vec<String>, String> {
    args.iter()
        .map(|arg| {
            let mut out = String::new();
            let mut rest = arg.as_str();
            while let Some(open) = rest.find('{') {
                out.push_str(&rest[..open]);
                let after = &rest[open + 1..];
                let name_len = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                let name = &after[..name_len];
                if !name.is_empty() && after[name_len..].starts_with('}') {
                    let v = values
                        .get(name)
                        .ok_or_else(|| format!("placeholder {{{name}}} has no value"))?;
                    out.push_str(v);
                    rest = &after[name_len + 1..];
                } else {
                    out.push('{');
                    rest = after;
                }
            }
            out.push_str(rest);
            Ok(out)
        })
        .collect()
}
