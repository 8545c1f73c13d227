//! Flywheel's wire contract, package `flywheel.v1`, and the small hand-written clients that wrap
//! the generated gRPC code.
//!
//! The generated modules stay private to this crate's `pb` module; other crates use the message
//! types re-exported from [`v1`], the server traits in [`v1::server`], and the clients
//! [`WorkerClient`] and [`ControlClient`], which add the bearer token to every call.

mod client;

mod pb {
    #![allow(unreachable_pub, missing_docs, clippy::all)]
    tonic::include_proto!("flywheel.v1");
}

pub use client::{ClientError, ControlClient, WorkerClient, connect_channel};

/// The `flywheel.v1` messages and the server-side service definitions.
pub mod v1 {
    pub use crate::pb::*;

    /// Server-side traits and wrappers, for the controller.
    pub mod server {
        pub use crate::pb::control_service_server::{ControlService, ControlServiceServer};
        pub use crate::pb::worker_service_server::{WorkerService, WorkerServiceServer};
    }
}

/// Encoded `FileDescriptorSet` of the protos, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/flywheel_descriptor.bin"));
