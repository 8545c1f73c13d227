//! The Kubernetes manifests in `deploy/kubernetes`: each validates against the Kubernetes
//! schemas (kubernetes-validate from PyPI, `--strict`: unknown fields are errors); the
//! kustomization lists every manifest; and every `flywheel` command line in them is one the
//! binary accepts, reading its secrets from the variables the binary reads.

mod common;

use std::path::PathBuf;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_flywheel");

fn manifests() -> (PathBuf, Vec<PathBuf>) {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    (dir, files)
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let (dir, files) = manifests();
    let validator = common::python().with_file_name("kubernetes-validate");
    assert!(
        validator.exists(),
        "{} is missing: run scripts/test, which installs kubernetes-validate",
        validator.display()
    );
    let out = Command::new(&validator)
        .args(["--strict", "--kubernetes-version", "1.30.0"])
        .args(&files)
        .output()
        .unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert!(!report.contains("ERROR"), "{report}");
    // The kustomization applies every manifest.
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(
            kustomization.contains(&format!("- {name}")),
            "kustomization.yaml lacks {name}"
        );
        assert!(
            report.contains(&format!("{name} passed")),
            "{name} was not checked: {report}"
        );
    }
}

#[test]
fn every_command_line_in_the_manifests_is_accepted_by_the_binary() {
    let (_, files) = manifests();
    let mut seen = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for doc in text.split("\n---\n") {
            let v: serde_json::Value = match serde_saphyr::from_str(doc) {
                Ok(v) => v,
                Err(e) => panic!("{}: {e}", f.display()),
            };
            let containers = &v["spec"]["template"]["spec"]["containers"];
            for c in containers.as_array().into_iter().flatten() {
                let args: Vec<String> = c["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().replace("$(POD_NAME)", "pod-0"))
                    .collect();
                // clap stops at --help once every argument before it parsed.
                let out = Command::new(BIN)
                    .args(&args)
                    .arg("--help")
                    .output()
                    .unwrap();
                let help = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success(),
                    "{}: `flywheel {}` is refused: {}",
                    f.display(),
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
                // The secrets the pod gets are the variables the command reads.
                let wanted = match args[0].as_str() {
                    "server" => "DATABASE_URL",
                    _ => "FLYWHEEL_TOKEN",
                };
                assert!(
                    help.contains(&format!("[env: {wanted}")),
                    "{}: {help}",
                    args[0]
                );
                let secrets = c["envFrom"].to_string();
                let secret = if wanted == "DATABASE_URL" {
                    "flywheel-database"
                } else {
                    "flywheel-worker-token"
                };
                assert!(
                    secrets.contains(secret),
                    "{}: no {secret} Secret",
                    f.display()
                );
                seen += 1;
            }
        }
    }
    assert_eq!(seen, 3, "the controller and two worker pools");
}
