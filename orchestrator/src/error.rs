use tonic::Status;

use crate::spec::SpecError;

/// Errors of the controller. Mapped to gRPC status codes in one place ([`From<Error> for Status`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    LimitReached(String),
    #[error("controller is shutting down")]
    ShuttingDown,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Longest gRPC error message sent; longer ones are cut (clients refuse large `grpc-message`
/// headers).
pub const MAX_STATUS_BYTES: usize = 4096;

impl Error {
    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            message: message.into(),
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let message = truncate(&e.to_string(), MAX_STATUS_BYTES);
        match &e {
            Error::Db(inner) => {
                tracing::error!(error = %inner, "database error");
                Status::unavailable("database unavailable; nothing was changed, retry later")
            }
            Error::Migrate(_) | Error::ShuttingDown => Status::unavailable(message),
            Error::Spec(_) | Error::InvalidArgument { .. } => Status::invalid_argument(message),
            Error::NotFound { .. } => Status::not_found(message),
            Error::FailedPrecondition(_) => Status::failed_precondition(message),
            Error::PermissionDenied(_) => Status::permission_denied(message),
            Error::LimitReached(_) => Status::resource_exhausted(message),
        }
    }
}

/// Parses a UUID from a request field, naming the field on error.
pub(crate) fn parse_id(field: &'static str, value: &str) -> Result<uuid::Uuid> {
    uuid::Uuid::parse_str(value).map_err(|_| {
        Error::invalid(
            field,
            format!("{} is not a valid id (expected a UUID)", excerpt(value)),
        )
    })
}

/// The start of a value for an error message: at most 64 characters, quoted.
pub(crate) fn excerpt(value: &str) -> String {
    match value.char_indices().nth(64) {
        Some((end, _)) => format!("{:?}… ({} bytes)", &value[..end], value.len()),
        None => format!("{value:?}"),
    }
}

/// `s` cut to at most `max` bytes at a character boundary, saying how much was cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(40);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} … ({} more bytes)", &s[..end], s.len() - end)
}
