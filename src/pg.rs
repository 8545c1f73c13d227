//! A private, throw-away Postgres cluster from the local PostgreSQL binaries, for `demo` when no
//! `DATABASE_URL` is given. Stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

pub(crate) struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    as_postgres: bool,
    /// Where the cluster lives (data, socket, log).
    pub(crate) root: PathBuf,
    /// A directory of our own made for the cluster, removed again when it stops.
    remove_on_drop: bool,
    pub(crate) url: String,
}

fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .collect();
    dirs.sort();
    dirs.into_iter().rev().find(|d| d.join("initdb").exists())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

impl PrivatePostgres {
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// initdb + pg_ctl start in `root` on a free port. Run as root, the server runs as the
    /// `postgres` user, which may not be able to enter `root` (any directory under `/root`, or a
    /// `mktemp -d`): then the cluster goes into a fresh directory of its own under `/tmp`,
    /// removed when it stops.
    pub(crate) fn start(root: &Path) -> Result<Self> {
        let bin = bin_dir().context(
            "no DATABASE_URL and no PostgreSQL binaries under /usr/lib/postgresql/*/bin: install Debian's 'postgresql' package or set DATABASE_URL",
        )?;
        let as_postgres = is_root();
        let (root, remove_on_drop) = if as_postgres {
            let dir = Path::new("/tmp").join(format!(
                "flywheel-demo-pg-{}",
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::create_dir(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            (dir, true)
        } else {
            let _ = std::fs::remove_dir_all(root);
            std::fs::create_dir_all(root)?;
            (std::fs::canonicalize(root)?, false)
        };
        if as_postgres {
            // initdb refuses to run as root.
            let ok = Command::new("chown")
                .arg("-R")
                .arg("postgres:")
                .arg(&root)
                .status()?
                .success();
            if !ok {
                bail!("cannot hand {} to the postgres user", root.display());
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let pg = Self {
            bin,
            data: root.join("data"),
            as_postgres,
            root: root.clone(),
            remove_on_drop,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        };
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&pg.data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .output()?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            root.display()
        );
        let out = pg
            .command("pg_ctl")
            .arg("-D")
            .arg(&pg.data)
            .arg("-l")
            .arg(root.join("log"))
            .args(["-w", "-o", &opts, "start"])
            .output()?;
        if !out.status.success() {
            bail!(
                "pg_ctl start failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(pg)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"])
            .output();
        if self.remove_on_drop {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}
