//! Helpers the command groups share: control-API options, error display, signals, files.

use anyhow::{Context, Result};
use flywheel_orchestrator::store;

#[derive(clap::Args)]
pub(crate) struct ControlOpts {
    /// Controller address.
    #[arg(
        long,
        env = "FLYWHEEL_CONTROLLER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub(crate) controller: String,
    /// API token (scope `read` for reads, `admin` for changes).
    #[arg(long, env = "FLYWHEEL_TOKEN", hide_env_values = true)]
    pub(crate) token: String,
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A spec or template file and its `--param name=value` values, errors naming the flag.
pub(super) fn read_with_params(
    file: &std::path::Path,
    params: &[String],
) -> Result<(String, std::collections::BTreeMap<String, String>)> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let params =
        flywheel_orchestrator::template::parse_assignments(params.iter().map(String::as_str))
            .map_err(|e| anyhow::anyhow!("--param: {e}"))?;
    Ok((text, params))
}

/// One connection for an admin command on the controller's host, with migrations applied.
pub(super) async fn admin_pool(database_url: &str) -> Result<sqlx::PgPool> {
    let pool = store::connect(database_url, 1)
        .await
        .context("cannot connect to Postgres")?;
    store::migrate(&pool).await.context("migrations failed")?;
    Ok(pool)
}

/// Writes `text` to `path` through a rename, so a reader never sees a partial file.
pub(crate) fn write_atomically(path: &std::path::Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A gRPC error as the user should read it: the server's message, with the code for scripts.
pub(crate) fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

/// `evaluate.win_rate>=0.6` → (`evaluate.win_rate`, `>=0.6`).
pub(super) fn parse_requirement(text: &str) -> Result<(String, String)> {
    let at = text.find(['>', '<']).with_context(|| {
        format!(
            "--require {text:?}: expected <stage>.<metric><op><number>, e.g. evaluate.win_rate>=0.6"
        )
    })?;
    Ok((text[..at].trim().to_string(), text[at..].trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements() {
        assert_eq!(
            parse_requirement("evaluate.win_rate >= 0.6").unwrap(),
            ("evaluate.win_rate".into(), ">= 0.6".into())
        );
        assert!(parse_requirement("evaluate.win_rate").is_err());
    }
}
