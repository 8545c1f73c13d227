//! Synthetic-data benchmarks.
//!
//! - dedup: exact and MinHash near-duplicate removal over 1M generated prompts (a templated
//!   opening and 20 to 40 words of a 20,000-word Zipf vocabulary; 5% planted exact and 5%
//!   planted near duplicates, one word replaced); goal ≤ 60 s on the 2-core machine.
//! - saturation: `synthesize_prompts` (open_qa, given topics, no revisions) against the scripted
//!   fixture server holding every answer L ms, with C requests in flight; goal: throughput
//!   ≥ 0.9 × C / L.
//!
//! `cargo bench --bench sdg -- [--prompts N] [--latency-ms L] [--concurrency C] [--requests R]`

mod common;

use common::arg;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flywheel_proto::v1::{ArtifactRef, Assignment};
use flywheel_worker::openai::OpenAiBackend;
use flywheel_worker::sdg::Rng;
use flywheel_worker::sdg::dedup::{self, Fate};
use flywheel_worker::{Backend, Task, TaskContext};
use serde_json::json;

/// Prompt openings, as templated pipelines write them.
const OPENINGS: [&str; 8] = [
    "Explain to a beginner",
    "Write a short essay about",
    "What are the main arguments for",
    "Describe in detail",
    "Compare and contrast",
    "Give three examples of",
    "Summarise the history of",
    "Why do people care about",
];

/// A vocabulary of 20,000 pronounceable words.
fn vocabulary(rng: &mut Rng) -> Vec<String> {
    const C: &[u8] = b"bcdfghjklmnprstvwz";
    const V: &[u8] = b"aeiou";
    (0..20_000)
        .map(|_| {
            (0..2 + rng.below(3))
                .flat_map(|_| [C[rng.below(C.len())] as char, V[rng.below(V.len())] as char])
                .collect()
        })
        .collect()
}

/// A word of rank r with probability ~ 1/r (Zipf).
fn word<'a>(vocab: &'a [String], rng: &mut Rng) -> &'a str {
    let r = (vocab.len() as f64).powf(rng.unit()) as usize;
    &vocab[r.min(vocab.len() - 1)]
}

fn dedup_bench(n: usize) {
    let mut rng = Rng::new(7);
    let vocab = vocabulary(&mut rng);
    let mut texts: Vec<String> = Vec::with_capacity(n);
    let mut planted = vec![false; n];
    while texts.len() < n {
        let r = rng.below(100);
        planted[texts.len()] = r < 10 && !texts.is_empty();
        if r < 5 && !texts.is_empty() {
            let i = rng.below(texts.len());
            texts.push(format!("{}!", texts[i].to_uppercase()));
        } else if r < 10 && !texts.is_empty() {
            let i = rng.below(texts.len());
            let mut words: Vec<String> = texts[i].split(' ').map(String::from).collect();
            let at = rng.below(words.len());
            words[at] = "zebra".into();
            texts.push(words.join(" "));
        } else {
            let len = 20 + rng.below(21);
            let mut t = OPENINGS[rng.below(OPENINGS.len())].to_string();
            for _ in 0..len {
                t.push(' ');
                t.push_str(word(&vocab, &mut rng));
            }
            texts.push(t);
        }
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let started = Instant::now();
    let fates = dedup::dedup(&refs, &[], &[], dedup::Settings::default());
    let secs = started.elapsed().as_secs_f64();
    let (kept, exact, near, _, _) = dedup::tally(&fates);
    assert_eq!(fates.len(), n);
    let removed = |i: usize| fates[i] != Fate::Kept;
    let true_pos = (0..n).filter(|i| removed(*i) && planted[*i]).count() as f64;
    let precision = true_pos / (n - kept) as f64;
    let recall = true_pos / planted.iter().filter(|p| **p).count() as f64;
    println!(
        "dedup: {n} prompts in {secs:.1} s ({:.0} prompts/s): kept {kept}, exact {exact}, near {near}, precision {precision:.4}, recall {recall:.4}; {:.2}x the 60 s budget for 1M",
        n as f64 / secs,
        secs / 60.0 * (1_000_000.0 / n as f64)
    );
}

fn saturation_bench(latency_ms: usize, concurrency: usize, requests: usize) {
    let dir = std::env::temp_dir().join(format!("flywheel-sdg-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let python = std::env::var("FLYWHEEL_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut server = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/sdg_scripted_server.py"
        ))
        .args([
            "--port",
            &port.to_string(),
            "--latency-ms",
            &latency_ms.to_string(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("start the scripted server");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the scripted server did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let topics: Vec<String> = (0..requests).map(|i| format!("topic number {i}")).collect();
    let params = json!({
        "base_url": format!("http://127.0.0.1:{port}/v1"), "topics": topics, "n_openlines": 2,
        "n_revisions": 0, "concurrency": concurrency, "dedup": false, "decontaminate": false,
    });
    let task = Task::new(Assignment {
        task_id: "bench".into(),
        attempt: 1,
        campaign_id: "bench".into(),
        round_index: 0,
        stage: "prompts".into(),
        kind: "synthesize_prompts".into(),
        shard_index: 0,
        shard_count: 1,
        params_json: params.to_string(),
        inputs: vec![ArtifactRef {
            id: "gen".into(),
            role: "generator".into(),
            kind: "model".into(),
            uri: "test://gen".into(),
            content_hash: String::new(),
            name: "gen".into(),
        }],
        output_prefix: format!("file://{}/out", dir.display()),
        backend: "openai".into(),
        endpoints: Vec::new(),
    })
    .unwrap();
    let started = Instant::now();
    let result = OpenAiBackend.run(&task, &TaskContext::default()).unwrap();
    let secs = started.elapsed().as_secs_f64();
    let _ = server.kill();
    let _ = server.wait();
    let sent = result.metrics["requests"];
    let throughput = sent / secs;
    let ideal = concurrency as f64 / (latency_ms as f64 / 1000.0);
    println!(
        "saturation: {sent} requests, latency {latency_ms} ms, {concurrency} in flight: {throughput:.1} req/s = {:.3} x C/L (goal >= 0.9)",
        throughput / ideal
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn main() {
    dedup_bench(arg("--prompts", 1_000_000));
    saturation_bench(
        arg("--latency-ms", 100),
        arg("--concurrency", 16),
        arg("--requests", 400),
    );
}
