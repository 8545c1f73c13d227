//! Flywheel's worker agent: registers with the controller, receives assignments over a server
//! stream, runs them on a [`Backend`], and reports heartbeats and results in batched `Report`
//! calls, one at a time per worker.
//!
//! Invariants: heartbeats are sent only while the assignment stream is open (a worker that
//! cannot hear the controller must not look alive); a task the controller abandons or cancels
//! is stopped and nothing more is reported for it; completions are retried until the controller
//! accepts or rejects them, never dropped on a transient error.

mod agent;
pub mod analytics;
pub mod artifacts;
mod backend;
pub mod datasets;
pub mod external;
mod http_client;
mod io;
pub mod openai;
pub mod reward_endpoint;
pub mod sdg;
pub mod test_backend;

pub use agent::{WorkerConfig, WorkerError, run};
pub use backend::{Backend, Output, Task, TaskContext, TaskError, TaskResult};
