//! Bearer-token authentication with three scopes. Only SHA-256 hashes of tokens are stored.
//! Good tokens are cached (for the controller's `token_cache_ttl_ms`), so that worker RPCs need
//! no query; a revocation empties the cache at once (a notification, [`crate::wake`]), and
//! the cache time bounds how long a revoked token could live if that notification were lost.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// Who made a request: the token (its id binds worker registrations to it), its name
/// (recorded as the actor of events) and its scope.
#[derive(Debug, Clone)]
pub struct Principal {
    pub token_id: uuid::Uuid,
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
    /// Known-good tokens by hash with when they were checked, so the hot worker RPCs do not
    /// query Postgres each time; an entry older than `ttl` is checked again.
    cache: Mutex<HashMap<String, (Principal, Instant)>>,
    ttl: Duration,
}

/// The token of an `Authorization` header value: the scheme is case-insensitive (RFC 9110).
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl Auth {
    pub(crate) fn new(pool: PgPool, ttl: Duration) -> Self {
        Self {
            pool,
            cache: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    /// Checks the request's bearer token: missing or unknown → UNAUTHENTICATED, known but
    /// without the needed scope → PERMISSION_DENIED.
    /// Forgets every checked token: the next request of each is checked against Postgres.
    pub(crate) fn forget(&self) {
        self.cache.lock().expect("auth cache").clear();
    }

    pub(crate) async fn require<T>(
        &self,
        req: &Request<T>,
        need: Scope,
    ) -> Result<Principal, Status> {
        let header = req.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated("missing authorization header (Bearer token)")
        })?;
        let token = header.to_str().ok().and_then(bearer_token).ok_or_else(|| {
            Status::unauthenticated("authorization header must be 'Bearer <token>'")
        })?;
        let hash = hash_token(token);
        let cached = self
            .cache
            .lock()
            .expect("auth cache")
            .get(&hash)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(p, _)| p.clone());
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
                    token_id: row.id,
                    name: row.name,
                    scope,
                };
                let mut cache = self.cache.lock().expect("auth cache");
                let ttl = self.ttl;
                cache.retain(|_, (_, at)| at.elapsed() < ttl);
                cache.insert(hash, (p.clone(), Instant::now()));
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

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
