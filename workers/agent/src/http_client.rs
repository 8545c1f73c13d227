//! JSON over HTTP for the backends that call model servers (OpenAI-compatible generation and
//! judging, reward endpoints): bearer keys read from an environment variable, retries with
//! exponential backoff on 429, 5xx, timeouts and connection errors, a bounded number of requests
//! in flight, and token accounting.
//!
//! Keys are never written to logs, errors, artifacts or Postgres: only the variable's name is in
//! the spec.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::backend::{Task, TaskContext, TaskError};

/// How a backend reaches one HTTP service, from a stage's params.
#[derive(Clone)]
pub(crate) struct HttpCaller {
    client: reqwest::Client,
    api_key: Option<String>,
    pub(crate) max_retries: u32,
    pub(crate) backoff_initial: Duration,
    pub(crate) in_flight: usize,
    pub(crate) stats: Arc<CallStats>,
}

/// Counters shared by the requests of one task, reported in heartbeats.
#[derive(Default)]
pub(crate) struct CallStats {
    pub(crate) requests: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) prompt_tokens: AtomicU64,
    pub(crate) completion_tokens: AtomicU64,
}

impl CallStats {
    pub(crate) fn metrics(&self) -> [(&'static str, f64); 4] {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        [
            ("requests", get(&self.requests)),
            ("retries", get(&self.retries)),
            ("prompt_tokens", get(&self.prompt_tokens)),
            ("completion_tokens", get(&self.completion_tokens)),
        ]
    }

    pub(crate) fn metric_map(&self) -> std::collections::HashMap<String, f64> {
        self.metrics()
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect()
    }

    /// Adds an OpenAI-style `usage` object.
    pub(crate) fn add_usage(&self, response: &Value) {
        let usage = &response["usage"];
        let n = |k: &str| usage[k].as_u64().unwrap_or(0);
        self.prompt_tokens
            .fetch_add(n("prompt_tokens"), Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(n("completion_tokens"), Ordering::Relaxed);
    }
}

/// The HTTP settings every HTTP backend's params declare (`api_key_env`, `timeout_s`,
/// `max_retries`, `retry_backoff_ms`, `concurrency`).
pub(crate) struct HttpSettings<'a> {
    pub(crate) api_key_env: &'a Option<String>,
    pub(crate) timeout_s: i64,
    pub(crate) max_retries: i64,
    pub(crate) retry_backoff_ms: i64,
    pub(crate) concurrency: i64,
}

/// The HTTP settings of a params struct of the contract that declares them.
macro_rules! http_settings {
    ($p:expr) => {
        $crate::http_client::HttpSettings {
            api_key_env: &$p.api_key_env,
            timeout_s: $p.timeout_s,
            max_retries: $p.max_retries,
            retry_backoff_ms: $p.retry_backoff_ms,
            concurrency: $p.concurrency,
        }
    };
}
pub(crate) use http_settings;

/// A required string param (the contract checks it at submission), or an error naming it.
pub(crate) fn required<'a>(
    task: &Task,
    key: &str,
    v: &'a Option<String>,
) -> Result<&'a str, TaskError> {
    v.as_deref()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| {
            TaskError::permanent(format!(
                "stage {}: params.{key} is required",
                task.assignment.stage
            ))
        })
}

impl HttpCaller {
    /// From the stage's HTTP settings; the key is read from the variable `api_key_env` names.
    pub(crate) fn new(task: &Task, settings: HttpSettings<'_>) -> Result<Self, TaskError> {
        let api_key = match settings.api_key_env.as_deref() {
            None | Some("") => None,
            Some(var) => Some(std::env::var(var).map_err(|_| {
                TaskError::permanent(format!(
                    "stage {}: params.api_key_env names {var:?}, which is not set in this worker's environment",
                    task.assignment.stage
                ))
            })?),
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(settings.timeout_s.max(1) as u64))
            .build()
            .map_err(|e| TaskError::permanent(format!("http client: {e}")))?;
        Ok(Self {
            client,
            api_key,
            max_retries: settings.max_retries.max(0) as u32,
            backoff_initial: Duration::from_millis(settings.retry_backoff_ms.max(0) as u64),
            in_flight: settings.concurrency.clamp(1, 1024) as usize,
            stats: Arc::new(CallStats::default()),
        })
    }

    /// POSTs `body` to `url` and returns the JSON answer, retrying transient failures.
    pub(crate) async fn post_json(&self, url: &str, body: &Value) -> Result<Value, TaskError> {
        let mut last = String::new();
        for attempt in 0..=self.max_retries {
            if attempt > 0 {
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                let backoff = self.backoff_initial * 2u32.pow((attempt - 1).min(10));
                tokio::time::sleep(backoff.min(Duration::from_secs(30))).await;
            }
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let mut req = self.client.post(url).json(body);
            if let Some(key) = &self.api_key {
                req = req.bearer_auth(key);
            }
            match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    return resp.json().await.map_err(|e| {
                        TaskError::retryable(format!("{url}: response is not JSON: {e}"))
                    });
                }
                Ok(resp) => {
                    let status = resp.status();
                    let text: String = resp
                        .text()
                        .await
                        .unwrap_or_default()
                        .chars()
                        .take(300)
                        .collect();
                    last = format!("{url}: HTTP {status}: {text}");
                    if !(status.as_u16() == 429 || status.is_server_error()) {
                        return Err(TaskError::permanent(last));
                    }
                }
                Err(e) if e.is_timeout() || e.is_connect() || e.is_request() => {
                    last = format!("{url}: {}", without_url(&e));
                }
                Err(e) => return Err(TaskError::permanent(format!("{url}: {}", without_url(&e)))),
            }
        }
        Err(TaskError::retryable(format!(
            "gave up after {} retries: {last}",
            self.max_retries
        )))
    }

    /// Runs `call(i)` for every `i` in `0..n` with at most `in_flight` at once, reporting
    /// progress and stopping when the controller cancels the task.
    pub(crate) fn run_all<T, F, Fut>(
        &self,
        n: usize,
        ctx: &TaskContext,
        what: &str,
        call: F,
    ) -> Result<Vec<T>, TaskError>
    where
        T: Send + 'static,
        F: Fn(usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, TaskError>> + Send + 'static,
    {
        let in_flight = self.in_flight;
        let ctx = ctx.clone();
        let stats = self.stats.clone();
        let what = what.to_string();
        crate::io::block_on(async move {
            let call = Arc::new(call);
            let mut set = tokio::task::JoinSet::new();
            let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
            let mut first_error = None;
            let (mut next, mut done) = (0, 0);
            loop {
                // Keep `in_flight` requests going; after a failure, send nothing more: the
                // stage fails with that error, at once.
                while next < n && set.len() < in_flight && first_error.is_none() {
                    if ctx.should_stop() {
                        set.abort_all();
                        return Err(TaskError::cancelled());
                    }
                    let call = call.clone();
                    let i = next;
                    set.spawn(async move { (i, call(i).await) });
                    next += 1;
                }
                let Some(joined) = set.join_next().await else {
                    break;
                };
                let (i, result) = match joined {
                    Ok(r) => r,
                    // Aborted after the first error, which is what the stage reports.
                    Err(e) if e.is_cancelled() && first_error.is_some() => continue,
                    Err(e) => {
                        return Err(TaskError::retryable(format!("request task failed: {e}")));
                    }
                };
                match result {
                    Ok(v) => out[i] = Some(v),
                    Err(e) => {
                        set.abort_all();
                        first_error.get_or_insert(e);
                        continue;
                    }
                }
                done += 1;
                ctx.report(
                    done as f64 / n.max(1) as f64,
                    format!("{what} {done}/{n}"),
                    &stats.metrics(),
                );
                if ctx.should_stop() {
                    set.abort_all();
                    return Err(TaskError::cancelled());
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
            Ok(out
                .into_iter()
                .map(|v| v.expect("every request finished"))
                .collect())
        })
    }
}

/// reqwest errors print their URL, which may carry query parameters; callers add the URL
/// themselves.
fn without_url(e: &reqwest::Error) -> String {
    let mut e2 = e.to_string();
    if let Some(url) = e.url() {
        e2 = e2.replace(url.as_str(), "<url>");
    }
    e2
}

/// A value inside JSON by a dotted path (`data.0.attributes`); `""` is the value itself.
pub(crate) fn at_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return Some(v);
    }
    path.split('.')
        .try_fold(v, |v, key| match key.parse::<usize>() {
            Ok(i) if v.is_array() => v.get(i),
            _ => v.get(key),
        })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use serde_json::json;

    use super::*;

    /// Serves one canned response per connection, in order; returns the requests' headers.
    fn canned(replies: Vec<String>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/v1/chat/completions",
            listener.local_addr().unwrap()
        );
        let server = std::thread::spawn(move || {
            let mut heads = Vec::new();
            for reply in replies {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = Vec::new();
                let mut byte = [0u8; 1];
                while !buf.ends_with(b"\r\n\r\n") {
                    s.read_exact(&mut byte).unwrap();
                    buf.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&buf).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |n| n.trim().parse().unwrap());
                let mut body = vec![0u8; len];
                s.read_exact(&mut body).unwrap();
                s.write_all(reply.as_bytes()).unwrap();
                heads.push(head);
            }
            heads
        });
        (url, server)
    }

    fn reply(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    fn caller(max_retries: u32) -> HttpCaller {
        HttpCaller {
            client: reqwest::Client::new(),
            api_key: Some("sk-secret".into()),
            max_retries,
            backoff_initial: Duration::from_millis(1),
            in_flight: 1,
            stats: Arc::new(CallStats::default()),
        }
    }

    #[test]
    fn transient_statuses_are_retried_with_the_key_and_errors_name_the_status() {
        let (url, server) = canned(vec![
            reply("429 Too Many Requests", "{}"),
            reply("503 Service Unavailable", "{\"error\": \"busy\"}"),
            reply("200 OK", "{\"ok\": true}"),
        ]);
        let c = caller(3);
        let stats = c.stats.clone();
        let got = crate::io::block_on(async move { c.post_json(&url, &json!({})).await });
        assert_eq!(got.unwrap(), json!({ "ok": true }));
        let heads = server.join().unwrap();
        assert!(
            heads
                .iter()
                .all(|h| h.contains("authorization: bearer sk-secret"))
        );
        assert_eq!(stats.retries.load(Ordering::Relaxed), 2);
        assert_eq!(stats.requests.load(Ordering::Relaxed), 3);

        // A client error is not retried; running out of retries is a retryable task error.
        let (url, server) = canned(vec![reply("400 Bad Request", "{\"error\": \"n\"}")]);
        let c = caller(3);
        let err =
            crate::io::block_on(async move { c.post_json(&url, &json!({})).await }).unwrap_err();
        server.join().unwrap();
        assert!(!err.retryable && err.message.contains("HTTP 400"), "{err}");
        assert!(!err.message.contains("sk-secret"));
        let (url, server) = canned(vec![reply("500 Internal Server Error", "{}"); 2]);
        let c = caller(1);
        let err =
            crate::io::block_on(async move { c.post_json(&url, &json!({})).await }).unwrap_err();
        server.join().unwrap();
        assert!(
            err.retryable && err.message.starts_with("gave up after 1 retries"),
            "{err}"
        );
    }

    #[test]
    fn a_permanent_error_stops_the_requests_still_to_send() {
        // Every request gets a 404 (as for an unknown model): the first one fails the stage
        // and, with 4 in flight, at most the 4 already sent are answered.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/v1/chat/completions",
            listener.local_addr().unwrap()
        );
        listener.set_nonblocking(true).unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let server = {
            let (served, stop) = (served.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            s.set_nonblocking(false).unwrap();
                            let mut buf = [0u8; 4096];
                            let _ = s.read(&mut buf);
                            served.fetch_add(1, Ordering::SeqCst);
                            let _ = s.write_all(
                                reply(
                                    "404 Not Found",
                                    "{\"error\": {\"message\": \"no such model\"}}",
                                )
                                .as_bytes(),
                            );
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        let mut c = caller(3);
        c.in_flight = 4;
        let ctx = TaskContext::default();
        let url = Arc::new(url);
        let client = Arc::new(c);
        let caller_ = client.clone();
        let err = client
            .run_all(256, &ctx, "requests", move |_| {
                let (c, url) = (caller_.clone(), url.clone());
                async move { c.post_json(&url, &json!({})).await }
            })
            .unwrap_err();
        stop.store(true, Ordering::SeqCst);
        server.join().unwrap();
        assert!(!err.retryable && err.message.contains("HTTP 404"), "{err}");
        let sent = served.load(Ordering::SeqCst);
        assert!(
            sent <= 5,
            "{sent} of 256 requests were sent after a permanent error"
        );
    }
}
