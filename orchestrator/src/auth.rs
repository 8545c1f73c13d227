//! Bearer-token authentication with three scopes. Only SHA-256 hashes of tokens are stored.

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tonic::{Request, Status};

use crate::store;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    Admin,
    /// The worker protocol.
    Worker,
    /// Read-only control API.
    Read,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Self::Admin),
            "worker" => Some(Self::Worker),
            "read" => Some(Self::Read),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Worker => "worker",
            Self::Read => "read",
        }
    }

    fn allows(self, need: Scope) -> bool {
        self == Scope::Admin || self == need
    }
}

/// Who made a request: the token's name (recorded as the actor of events) and its scope.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub scope: Scope,
}

pub fn hash_token(token: &str) -> String {
    format!("{:x}", Sha256::digest(token.as_bytes()))
}

/// A new random token: `fw_` and 64 hex digits (256 random bits from the OS).
pub fn new_token() -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    let c = uuid::Uuid::new_v4().simple().to_string();
    format!("fw_{}", &(a + &b + &c)[..64])
}

/// Creates a token and stores its hash; the token is returned once and never again.
pub async fn create_token(pool: &PgPool, name: &str, scope: Scope) -> Result<String, sqlx::Error> {
    let token = new_token();
    let mut conn = pool.acquire().await?;
    store::api_tokens::insert(&mut conn, name, scope.as_str(), &hash_token(&token)).await?;
    Ok(token)
}

pub(crate) struct Auth {
    pool: PgPool,
    /// Known-good tokens by hash, so the hot worker RPCs do not query Postgres each time.
    cache: Mutex<HashMap<String, Principal>>,
}

impl Auth {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self {
            pool,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Checks the request's bearer token: missing or unknown → UNAUTHENTICATED, known but
    /// without the needed scope → PERMISSION_DENIED.
    pub(crate) async fn require<T>(
        &self,
        req: &Request<T>,
        need: Scope,
    ) -> Result<Principal, Status> {
        let header = req.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated("missing authorization header (Bearer token)")
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("authorization header must be 'Bearer <token>'")
            })?;
        let hash = hash_token(token.trim());
        let cached = self.cache.lock().expect("auth cache").get(&hash).cloned();
        let principal = match cached {
            Some(p) => p,
            None => {
                let mut conn = self.pool.acquire().await.map_err(|e| {
                    tracing::error!(error = %e, "token lookup failed");
                    Status::unavailable("cannot check token: database unavailable")
                })?;
                let row = store::api_tokens::find(&mut conn, &hash)
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "token lookup failed");
                        Status::unavailable("cannot check token: database unavailable")
                    })?;
                let row = row.ok_or_else(|| Status::unauthenticated("unknown or revoked token"))?;
                let scope = Scope::parse(&row.scope)
                    .ok_or_else(|| Status::internal("token has an unknown scope"))?;
                let p = Principal {
                    name: row.name,
                    scope,
                };
                self.cache
                    .lock()
                    .expect("auth cache")
                    .insert(hash, p.clone());
                p
            }
        };
        if principal.scope.allows(need) {
            Ok(principal)
        } else {
            Err(Status::permission_denied(format!(
                "token {:?} has scope {:?}; this call needs {:?}",
                principal.name,
                principal.scope.as_str(),
                need.as_str()
            )))
        }
    }
}
