//! `flywheel token ...`: API tokens, straight in Postgres (run on the controller's host).

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use flywheel_orchestrator::{auth, store};

use super::common::admin_pool;

#[derive(Subcommand)]
pub(super) enum TokenCommand {
    /// Create a token and print it once; only its hash is stored.
    Create {
        #[arg(long, value_parser = ["admin", "worker", "read"])]
        scope: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// List tokens: id, name, scope, created, revoked (never the tokens themselves).
    List {
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Revoke tokens by id or name. Running controllers refuse them at once (they are
    /// notified), at the latest after their token cache time (`--token-cache-ttl-ms`, 60 s).
    Revoke {
        /// A token id, or a name (every unrevoked token of that name).
        token: String,
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

pub(super) async fn run(command: TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Create {
            scope,
            name,
            database_url,
        } => {
            let pool = admin_pool(&database_url).await?;
            let scope = auth::Scope::parse(&scope).context("unknown scope")?;
            let name = name.unwrap_or_else(|| format!("{}-token", scope.as_str()));
            if name.trim().is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
                bail!("--name: must be 1 to 200 characters without control characters");
            }
            let token = auth::create_token(&pool, &name, scope).await?;
            println!("{token}");
        }
        TokenCommand::List { database_url } => {
            let pool = admin_pool(&database_url).await?;
            let mut conn = pool.acquire().await?;
            println!(
                "{:<38} {:<24} {:<7} {:<26} REVOKED",
                "ID", "NAME", "SCOPE", "CREATED"
            );
            for t in store::api_tokens::list(&mut conn).await? {
                println!(
                    "{:<38} {:<24} {:<7} {:<26} {}",
                    t.id,
                    t.name,
                    t.scope,
                    t.created_at.to_rfc3339(),
                    t.revoked_at
                        .map(|r| r.to_rfc3339())
                        .unwrap_or_else(|| "-".into())
                );
            }
        }
        TokenCommand::Revoke {
            token,
            database_url,
        } => {
            let pool = admin_pool(&database_url).await?;
            let mut conn = pool.acquire().await?;
            let revoked = store::api_tokens::revoke(&mut conn, &token).await?;
            if revoked.is_empty() {
                bail!(
                    "no unrevoked token has the id or name {token:?} (see `flywheel token list`)"
                );
            }
            for id in revoked {
                println!("revoked {id}");
            }
        }
    }
    Ok(())
}
