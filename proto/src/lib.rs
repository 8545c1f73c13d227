//! Flywheel's wire contract, package `flywheel.v1`, and the small hand-written clients that wrap
//! the generated gRPC code.
//!
//! The generated modules stay private to this crate's `pb` module; other crates use the message
//! types re-exported from [`v1`], the server traits in [`v1::server`], and the clients
//! [`WorkerClient`] and [`ControlClient`], which add the bearer token to every call.

mod client;
pub mod codec;
pub mod stage;
pub mod state;

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

/// Sizes a message's fields may have, shared by the controller (which refuses more, naming the
/// field) and the workers (which cut what they send to fit).
pub mod limits {
    /// Names and identifiers: worker, pool, backend, metric, label, output name.
    pub const MAX_NAME_BYTES: usize = 200;
    /// Free text: progress messages, failure errors, output metadata.
    pub const MAX_TEXT_BYTES: usize = 16 * 1024;
    /// Entries in one list or map of a request (tasks of a heartbeat, outputs, metrics, labels).
    pub const MAX_ENTRIES: usize = 1024;

    /// `text` made storable within `max` bytes: NUL characters (which Postgres refuses) become
    /// U+FFFD, and if it is too long its end is kept (the last lines of a log say most).
    pub fn fit_text(text: &str, max: usize) -> String {
        let clean = text.replace('\0', "\u{fffd}");
        if clean.len() <= max {
            return clean;
        }
        let marker = "… (cut) ";
        let mut start = clean.len() - (max - marker.len());
        while !clean.is_char_boundary(start) {
            start += 1;
        }
        format!("{marker}{}", &clean[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::limits::fit_text;

    #[test]
    fn text_is_made_storable_keeping_its_end() {
        assert_eq!(fit_text("loss\0=1", 100), "loss\u{fffd}=1");
        let log = format!("{}last line: exit 3", "é".repeat(10_000));
        let fitted = fit_text(&log, 1000);
        assert!(fitted.len() <= 1000, "{}", fitted.len());
        assert!(fitted.starts_with("… (cut) ") && fitted.ends_with("last line: exit 3"));
    }
}
