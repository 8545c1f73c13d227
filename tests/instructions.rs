//! Flywheel's IFEval checkers against lm-eval's own (installed from PyPI by `scripts/test`): the
//! hand-written cases of `workers/agent/tests/fixtures/ifeval_cases.json`, strict and loose,
//! must get the same verdicts from both. lm-eval counts sentences and capital words with NLTK's
//! punkt data, which cannot be downloaded here; those cases are checked by Flywheel's unit tests
//! only (the script skips cases marked `punkt`).

mod common;

use std::process::Command;

use flywheel_worker::sdg::instructions::Instruction;
use serde_json::Value;

#[test]
fn flywheel_and_lm_eval_agree_on_every_hand_written_case() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/workers/agent/tests/fixtures");
    let cases_path = format!("{fixtures}/ifeval_cases.json");
    let out = Command::new(common::python())
        .arg(format!("{fixtures}/ifeval_crosscheck.py"))
        .arg(&cases_path)
        .output()
        .expect("run lm-eval's checkers");
    assert!(
        out.status.success(),
        "lm-eval's checkers failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&cases_path).unwrap()).unwrap();
    let mut compared = 0;
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let theirs: Value = serde_json::from_str(line).unwrap();
        let case = &cases[theirs["index"].as_u64().unwrap() as usize];
        let id = case["id"].as_str().unwrap();
        let ins = Instruction::from_ifeval(id, &case["kwargs"]).unwrap();
        let response = case["response"].as_str().unwrap();
        assert_eq!(
            ins.strict(response),
            theirs["strict"].as_bool().unwrap(),
            "strict {id} on {response:?}"
        );
        assert_eq!(
            ins.loose(response),
            theirs["loose"].as_bool().unwrap(),
            "loose {id} on {response:?}"
        );
        compared += 1;
    }
    let skipped = cases.iter().filter(|c| c["punkt"] == true).count();
    assert_eq!(compared + skipped, cases.len());
    println!("{compared} cases agree with lm-eval ({skipped} punkt cases skipped)");
}
