//! The artifact store as workers see it: datasets and models addressed by URI, with content
//! hashes. This implementation serves `file://` URIs (a directory root shared by the controller
//! and its workers).

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("unsupported artifact uri {0:?} (this worker reads file:// uris)")]
    Unsupported(String),
    #[error("cannot read artifact {uri}: {source}")]
    Read { uri: String, source: std::io::Error },
    #[error("cannot write artifact {uri}: {source}")]
    Write { uri: String, source: std::io::Error },
    #[error("artifact {uri} is corrupt: content hash {actual} does not match recorded {expected}")]
    HashMismatch {
        uri: String,
        expected: String,
        actual: String,
    },
}

/// `sha256:<hex>` of some bytes.
pub fn content_hash(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

pub fn path_of(uri: &str) -> Result<PathBuf, ArtifactError> {
    uri.strip_prefix("file://")
        .map(PathBuf::from)
        .ok_or_else(|| ArtifactError::Unsupported(uri.to_string()))
}

/// Writes `bytes` as `<prefix>/<file>` atomically (temp file + rename) and returns its uri and hash.
pub fn write(prefix: &str, file: &str, bytes: &[u8]) -> Result<(String, String), ArtifactError> {
    let uri = format!("{}/{file}", prefix.trim_end_matches('/'));
    let path = path_of(&uri)?;
    let err = |source| ArtifactError::Write {
        uri: uri.clone(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = path.with_extension("partial");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok((uri.clone(), content_hash(bytes)))
}

/// Reads an artifact; when `expected_hash` is non-empty the content must match it.
pub fn read(uri: &str, expected_hash: &str) -> Result<Vec<u8>, ArtifactError> {
    let path = path_of(uri)?;
    let bytes = std::fs::read(&path).map_err(|source| ArtifactError::Read {
        uri: uri.to_string(),
        source,
    })?;
    if !expected_hash.is_empty() {
        let actual = content_hash(&bytes);
        if actual != expected_hash {
            return Err(ArtifactError::HashMismatch {
                uri: uri.to_string(),
                expected: expected_hash.to_string(),
                actual,
            });
        }
    }
    Ok(bytes)
}

/// Content hash of a directory: SHA-256 over its files' names and bytes, in name order.
pub fn hash_dir(dir: &Path) -> Result<String, ArtifactError> {
    let uri = format!("file://{}", dir.display());
    let err = |source| ArtifactError::Read {
        uri: uri.clone(),
        source,
    };
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(err)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    let mut h = Sha256::new();
    for name in names {
        h.update(name.as_encoded_bytes());
        h.update([0]);
        h.update(std::fs::read(dir.join(&name)).map_err(err)?);
    }
    Ok(format!("sha256:{:x}", h.finalize()))
}

/// The local directory behind a `file://` uri, after checking its content hash (when one is
/// recorded).
pub fn verified_dir(uri: &str, expected_hash: &str) -> Result<PathBuf, ArtifactError> {
    let path = path_of(uri)?;
    if !expected_hash.is_empty() {
        let actual = hash_dir(&path)?;
        if actual != expected_hash {
            return Err(ArtifactError::HashMismatch {
                uri: uri.to_string(),
                expected: expected_hash.to_string(),
                actual,
            });
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("fw-art-{}", uuid::Uuid::new_v4()));
        let prefix = format!("file://{}/a/b", dir.display());
        let (uri, hash) = write(&prefix, "x.jsonl", b"{\"a\":1}\n").unwrap();
        assert_eq!(read(&uri, &hash).unwrap(), b"{\"a\":1}\n");
        std::fs::write(path_of(&uri).unwrap(), b"tampered").unwrap();
        assert!(matches!(
            read(&uri, &hash),
            Err(ArtifactError::HashMismatch { .. })
        ));
        assert!(matches!(
            read("s3://bucket/x", ""),
            Err(ArtifactError::Unsupported(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
