//! serve-model benchmark: generated tokens/s of `flywheel serve-model` with 1, 16 and 64
//! concurrent clients (each sending one chat request at a time, n = 1), next to the engine's
//! in-process batched sampling of the same prompts in batches of 64, on the same checkpoint.
//!
//! `cargo bench --bench serve_model -- [--max-tokens N] [--rounds R] [--pairs P]`. Prints
//! tokens/s per setting, then P interleaved pairs (in-process, 64 clients) and the median of
//! their ratios, so that the machine's drift hits both sides alike.

mod common;

use common::arg;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flywheel_engine::sample::{SampleConfig, sample_ids};

const BIN: &str = env!("CARGO_BIN_EXE_flywheel");

fn prompts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i % 3 {
            0 => format!("add {} {}", i % 97, i % 13),
            1 => format!("upper {}", ["abc", "hello", "dog"][i % 3]),
            _ => format!("reverse {}", ["flywheel", "batch", "serve"][i % 3]),
        })
        .collect()
}

/// One chat request over a fresh connection; returns the completion tokens.
fn chat(addr: &str, prompt: &str, max_tokens: usize, seed: usize) -> usize {
    let body = serde_json::json!({
        "model": "bench", "messages": [{ "role": "user", "content": prompt }],
        "max_tokens": max_tokens, "temperature": 1.0, "seed": seed,
    })
    .to_string();
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to serve-model");
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    let json = raw.split_once("\r\n\r\n").expect("an HTTP response").1;
    let v: serde_json::Value = serde_json::from_str(json).expect("a JSON answer");
    v["usage"]["completion_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no usage in {v}")) as usize
}

/// Tokens/s of `clients` threads sending `per_client` requests each.
fn served(addr: &str, clients: usize, per_client: usize, max_tokens: usize) -> f64 {
    let ps = prompts(clients * per_client);
    let began = Instant::now();
    let tokens: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let ps = &ps;
                s.spawn(move || {
                    (0..per_client)
                        .map(|r| {
                            let i = c * per_client + r;
                            chat(addr, &ps[i], max_tokens, i)
                        })
                        .sum::<usize>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    tokens as f64 / began.elapsed().as_secs_f64()
}

fn main() {
    let max_tokens = arg("--max-tokens", 24);
    let rounds = arg("--rounds", 4);
    let dir = std::env::temp_dir().join(format!("flywheel-serve-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("model");
    let ok = Command::new(BIN)
        .args(["init-model", "--size", "small", "--output"])
        .arg(&model)
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "flywheel init-model failed");

    // In-process: the engine's batched, KV-cached sampler, batches of 64.
    let device = flywheel_engine::default_device();
    let m = flywheel_engine::checkpoint::load_frozen(&model, &device).unwrap();
    let ps = prompts(64 * rounds);
    let cfg = SampleConfig {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        max_tokens,
        seed: 1,
        batch_size: 64,
    };
    let in_process = || {
        let began = Instant::now();
        let out = sample_ids(&m, &ps, 1, &cfg, &mut |_, _| true).unwrap();
        let tokens: usize = out.iter().map(|s| s[0].len()).sum();
        tokens as f64 / began.elapsed().as_secs_f64()
    };

    let addr_file = dir.join("addr");
    let mut server = Command::new(BIN)
        .args([
            "serve-model",
            "--name",
            "bench",
            "--addr",
            "127.0.0.1:0",
            "--model",
        ])
        .arg(&model)
        .arg("--addr-file")
        .arg(&addr_file)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve-model");
    let addr = wait_for(&addr_file);
    // The same number of requests in every setting, fewer for one client (it is slow).
    let clients_rate = |clients: usize| {
        let per_client = if clients == 1 {
            16
        } else {
            64 * rounds / clients
        };
        served(&addr, clients, per_client, max_tokens)
    };
    println!(
        "serve-model benchmark: small model, max_tokens {max_tokens}, {} requests per setting",
        64 * rounds
    );
    println!("{:<28} {:>12}", "setting", "tokens/s");
    println!("{:<28} {:>12.0}", "in-process, batches of 64", in_process());
    for clients in [1, 16, 64] {
        println!(
            "{:<28} {:>12.0}",
            format!("serve-model, {clients} clients"),
            clients_rate(clients)
        );
    }
    let mut ratios = Vec::new();
    for pair in 0..arg("--pairs", 3) {
        let (a, b) = (in_process(), clients_rate(64));
        println!(
            "pair {}: in-process {a:.0}, 64 clients {b:.0} tokens/s: {:.2}",
            pair + 1,
            b / a
        );
        ratios.push(b / a);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "ratio, 64 clients / in-process (median of pairs): {:.2}",
        ratios[ratios.len() / 2]
    );
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

fn wait_for(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.is_empty()
        {
            return s.trim().to_string();
        }
        assert!(Instant::now() < deadline, "serve-model did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}
