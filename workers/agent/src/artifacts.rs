//! The artifact store as workers see it: datasets and models addressed by URI, with content
//! hashes verified on every read.
//!
//! Two kinds of store:
//! - `file:///root/...`: a directory shared by the controller and its workers;
//! - `s3://bucket/key...`: any S3-compatible store, through the `object_store` crate. Credentials
//!   and endpoint come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//!   `AWS_REGION`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, ...), never from a spec. Objects above
//!   [`MULTIPART_THRESHOLD`] are uploaded in parts. A model (a directory) is stored as one object
//!   per file under its prefix and downloaded into a content-addressed local cache before use.
//!
//! The functions are synchronous, for backends running on blocking threads; S3 calls run on
//! the crate's I/O runtime ([`crate::io`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};

use crate::io::block_on;

/// Objects larger than this are uploaded with multipart upload, in parts of this size.
pub const MULTIPART_THRESHOLD: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("unsupported artifact uri {0:?} (expected file:// or s3://)")]
    Unsupported(String),
    #[error("cannot read artifact {uri}: {source}")]
    Read { uri: String, source: std::io::Error },
    #[error("cannot write artifact {uri}: {source}")]
    Write { uri: String, source: std::io::Error },
    #[error("object store error for {uri}: {message}")]
    Store { uri: String, message: String },
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

enum Location {
    File(PathBuf),
    S3 { bucket: String, key: String },
}

fn locate(uri: &str) -> Result<Location, ArtifactError> {
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(Location::File(PathBuf::from(path)));
    }
    if let Some(rest) = uri.strip_prefix("s3://")
        && let Some((bucket, key)) = rest.split_once('/')
        && !bucket.is_empty()
    {
        return Ok(Location::S3 {
            bucket: bucket.to_string(),
            key: key.trim_matches('/').to_string(),
        });
    }
    Err(ArtifactError::Unsupported(uri.to_string()))
}

/// The local path behind a `file://` uri.
pub fn path_of(uri: &str) -> Result<PathBuf, ArtifactError> {
    match locate(uri)? {
        Location::File(p) => Ok(p),
        Location::S3 { .. } => Err(ArtifactError::Unsupported(format!(
            "{uri} (a local path was needed)"
        ))),
    }
}

type BucketOptions = std::collections::HashMap<String, Vec<(String, String)>>;

fn s3_overrides() -> &'static Mutex<BucketOptions> {
    static OVERRIDES: OnceLock<Mutex<BucketOptions>> = OnceLock::new();
    OVERRIDES.get_or_init(Default::default)
}

/// Sets options for one bucket on top of the environment (keys as in `object_store`'s
/// `AmazonS3ConfigKey`, e.g. `aws_endpoint`, `aws_access_key_id`, `aws_allow_http`). For
/// embedding and tests; workers normally take everything from the environment. Call it before
/// the bucket is first used.
pub fn configure_s3_bucket(bucket: &str, options: &[(&str, &str)]) {
    let mut o = s3_overrides().lock().expect("s3 options");
    o.entry(bucket.to_string())
        .or_default()
        .extend(options.iter().map(|(k, v)| (k.to_string(), v.to_string())));
}

/// One client per bucket, configured from the environment.
fn s3(bucket: &str, uri: &str) -> Result<Arc<dyn ObjectStore>, ArtifactError> {
    static STORES: OnceLock<Mutex<std::collections::HashMap<String, Arc<dyn ObjectStore>>>> =
        OnceLock::new();
    let mut stores = STORES.get_or_init(Default::default).lock().expect("stores");
    if let Some(s) = stores.get(bucket) {
        return Ok(s.clone());
    }
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let overrides = s3_overrides().lock().expect("s3 options");
    for (key, value) in overrides.get(bucket).into_iter().flatten() {
        let key = key
            .parse()
            .map_err(|e| store_error(uri, format!("S3 option {key:?}: {e}")))?;
        builder = builder.with_config(key, value);
    }
    let store: Arc<dyn ObjectStore> = Arc::new(builder.build().map_err(|e| store_error(uri, e))?);
    stores.insert(bucket.to_string(), store.clone());
    Ok(store)
}

fn store_error(uri: &str, e: impl std::fmt::Display) -> ArtifactError {
    ArtifactError::Store {
        uri: uri.to_string(),
        message: e.to_string(),
    }
}

/// Checks `expected_hash` (when one is recorded) against the hash `actual` computes.
fn check(
    uri: &str,
    expected_hash: &str,
    actual: impl FnOnce() -> Result<String, ArtifactError>,
) -> Result<(), ArtifactError> {
    if expected_hash.is_empty() {
        return Ok(());
    }
    let actual = actual()?;
    if actual != expected_hash {
        return Err(ArtifactError::HashMismatch {
            uri: uri.to_string(),
            expected: expected_hash.to_string(),
            actual,
        });
    }
    Ok(())
}

async fn put_object(
    store: Arc<dyn ObjectStore>,
    key: ObjectPath,
    bytes: Vec<u8>,
) -> object_store::Result<()> {
    if bytes.len() <= MULTIPART_THRESHOLD {
        store.put(&key, PutPayload::from(bytes)).await?;
        return Ok(());
    }
    let upload = store.put_multipart(&key).await?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, MULTIPART_THRESHOLD);
    writer.write(&bytes);
    writer.finish().await?;
    Ok(())
}

/// Writes `bytes` as `<prefix>/<file>` and returns its uri and content hash. Local files are
/// written atomically (temp file + rename); S3 objects become visible whole.
pub fn write(prefix: &str, file: &str, bytes: &[u8]) -> Result<(String, String), ArtifactError> {
    let uri = format!("{}/{file}", prefix.trim_end_matches('/'));
    match locate(&uri)? {
        Location::File(path) => {
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
        }
        Location::S3 { bucket, key } => {
            let store = s3(&bucket, &uri)?;
            let data = bytes.to_vec();
            block_on(put_object(store, ObjectPath::from(key), data))
                .map_err(|e| store_error(&uri, e))?;
        }
    }
    Ok((uri, content_hash(bytes)))
}

/// Reads an artifact; when `expected_hash` is non-empty the content must match it.
pub fn read(uri: &str, expected_hash: &str) -> Result<Vec<u8>, ArtifactError> {
    let bytes = match locate(uri)? {
        Location::File(path) => std::fs::read(&path).map_err(|source| ArtifactError::Read {
            uri: uri.to_string(),
            source,
        })?,
        Location::S3 { bucket, key } => {
            let store = s3(&bucket, uri)?;
            block_on(async move {
                store
                    .get(&ObjectPath::from(key))
                    .await?
                    .bytes()
                    .await
                    .map(|b| b.to_vec())
            })
            .map_err(|e| store_error(uri, e))?
        }
    };
    check(uri, expected_hash, || Ok(content_hash(&bytes)))?;
    Ok(bytes)
}

/// The files under `dir`, recursively, as paths relative to it with `/` separators, sorted.
fn files_of(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(dir.join(&rel))? {
            let entry = entry?;
            let name = rel.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                stack.push(name);
            } else {
                out.push(name.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Content hash of a directory: SHA-256 over its files' relative paths and bytes, in path order.
pub fn hash_dir(dir: &Path) -> Result<String, ArtifactError> {
    let uri = format!("file://{}", dir.display());
    let err = |source| ArtifactError::Read {
        uri: uri.clone(),
        source,
    };
    let mut h = Sha256::new();
    for name in files_of(dir).map_err(err)? {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(std::fs::read(dir.join(&name)).map_err(err)?);
    }
    Ok(format!("sha256:{:x}", h.finalize()))
}

fn check_dir(uri: &str, dir: &Path, expected_hash: &str) -> Result<(), ArtifactError> {
    check(uri, expected_hash, || hash_dir(dir))
}

/// A local directory holding the model (or other directory artifact) at `uri`, after checking
/// its content hash. S3 directories are downloaded into a cache keyed by that hash.
pub fn verified_dir(uri: &str, expected_hash: &str) -> Result<PathBuf, ArtifactError> {
    match locate(uri)? {
        Location::File(path) => {
            check_dir(uri, &path, expected_hash)?;
            Ok(path)
        }
        Location::S3 { bucket, key } => {
            let cache = cache_root().join(if expected_hash.is_empty() {
                content_hash(uri.as_bytes())
            } else {
                expected_hash.replace(':', "-")
            });
            if cache.exists() && check_dir(uri, &cache, expected_hash).is_ok() {
                return Ok(cache);
            }
            let staging = cache.with_extension(format!("partial-{}", uuid::Uuid::new_v4()));
            download_prefix(&s3(&bucket, uri)?, &key, &staging, uri)?;
            check_dir(uri, &staging, expected_hash)?;
            let _ = std::fs::remove_dir_all(&cache);
            std::fs::rename(&staging, &cache).map_err(|source| ArtifactError::Write {
                uri: uri.to_string(),
                source,
            })?;
            Ok(cache)
        }
    }
}

fn cache_root() -> PathBuf {
    std::env::var_os("FLYWHEEL_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("flywheel-cache"))
}

fn download_prefix(
    store: &Arc<dyn ObjectStore>,
    key: &str,
    into: &Path,
    uri: &str,
) -> Result<(), ArtifactError> {
    let store = store.clone();
    let prefix = ObjectPath::from(key);
    let objects = block_on(async move {
        use tokio_stream::StreamExt;
        let mut listed = store.list(Some(&prefix));
        let mut out = Vec::new();
        while let Some(meta) = listed.next().await {
            let meta = meta?;
            let bytes = store.get(&meta.location).await?.bytes().await?;
            out.push((meta.location.to_string(), bytes.to_vec()));
        }
        Ok::<_, object_store::Error>(out)
    })
    .map_err(|e| store_error(uri, e))?;
    if objects.is_empty() {
        return Err(store_error(uri, "no objects under this prefix"));
    }
    for (location, bytes) in objects {
        let rel = location
            .strip_prefix(key)
            .unwrap_or(&location)
            .trim_start_matches('/');
        let path = into.join(rel);
        let err = |source| ArtifactError::Write {
            uri: uri.to_string(),
            source,
        };
        std::fs::create_dir_all(path.parent().unwrap_or(into)).map_err(err)?;
        std::fs::write(&path, bytes).map_err(err)?;
    }
    Ok(())
}

/// Where to build a directory artifact that will live at `uri`: the directory itself for
/// `file://`, a fresh local staging directory for S3 (published by [`publish_dir`]).
pub fn output_dir(uri: &str) -> Result<PathBuf, ArtifactError> {
    match locate(uri)? {
        Location::File(path) => Ok(path),
        Location::S3 { .. } => Ok(cache_root().join(format!("staging-{}", uuid::Uuid::new_v4()))),
    }
}

/// Makes the directory built in `local` (from [`output_dir`]) the artifact at `uri`: uploads its
/// files when `uri` is on S3. Returns its content hash.
pub fn publish_dir(local: &Path, uri: &str) -> Result<String, ArtifactError> {
    let hash = hash_dir(local)?;
    if let Location::S3 { bucket, key } = locate(uri)? {
        let store = s3(&bucket, uri)?;
        let files = files_of(local).map_err(|source| ArtifactError::Read {
            uri: format!("file://{}", local.display()),
            source,
        })?;
        for rel in files {
            let bytes = std::fs::read(local.join(&rel)).map_err(|source| ArtifactError::Read {
                uri: format!("file://{}/{rel}", local.display()),
                source,
            })?;
            let object = ObjectPath::from(format!("{key}/{rel}"));
            block_on(put_object(store.clone(), object, bytes)).map_err(|e| store_error(uri, e))?;
        }
        let _ = std::fs::remove_dir_all(local);
    }
    Ok(hash)
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
            read("gs://bucket/x", ""),
            Err(ArtifactError::Unsupported(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn directory_hash_covers_nested_files_by_relative_path() {
        let dir = std::env::temp_dir().join(format!("fw-dir-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.json"), b"1").unwrap();
        std::fs::write(dir.join("sub/b.bin"), b"2").unwrap();
        let h1 = hash_dir(&dir).unwrap();
        std::fs::write(dir.join("sub/b.bin"), b"3").unwrap();
        assert_ne!(h1, hash_dir(&dir).unwrap());
        assert_eq!(files_of(&dir).unwrap(), ["a.json", "sub/b.bin"]);
        let uri = format!("file://{}", dir.display());
        assert!(verified_dir(&uri, &h1).is_err());
        assert_eq!(publish_dir(&dir, &uri).unwrap(), hash_dir(&dir).unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
