//! gRPC services: the worker protocol and the control API. Handlers authenticate, turn request
//! fields into domain values (naming the field when one is bad), and call the planner, ops and
//! writer modules; they contain no SQL.

mod control;
mod convert;
mod worker;

pub(crate) use control::ControlApi;
pub(crate) use worker::WorkerApi;
