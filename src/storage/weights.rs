//! Turns a weights location (local path, `file://`, `hf://`, or an object-store URL) into a
//! local safetensors file, downloading into a cache whose every file has its sha256 recorded.
//!
//! Downloads go to `FILE.part` and are renamed only once complete and verified, so a crash or a
//! lost connection never leaves a truncated file under the final name, and the next call
//! resumes from where the `.part` ends.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::{info, warn};
use url::Url;

use super::location::Location;
use super::scheme::{scheme_of, unsupported_scheme, STORE_SCHEMES};
use crate::error::{Error, Result};

const HF_DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const HF_DEFAULT_FILE: &str = "model.safetensors";
const HF_DEFAULT_REVISION: &str = "main";
const MAX_REDIRECTS: usize = 10;
/// Object-store reads go in ranges of this size so that a broken transfer keeps what arrived.
const STORE_CHUNK: u64 = 8 << 20;
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Root of ditrun's download cache: `$DITRUN_CACHE_DIR`, else `<user cache dir>/ditrun`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("DITRUN_CACHE_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => dirs::cache_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("ditrun"),
    }
}

/// Returns a local path to the safetensors file that `spec` names.
///
/// - a plain path or `file:///abs/path`: that file, which must exist;
/// - `hf://ORG/REPO[/FILE][@REVISION]` (FILE defaults to `model.safetensors`, REVISION to
///   `main`): downloaded from `$HF_ENDPOINT` (default `https://huggingface.co`) with
///   `$HF_TOKEN` as bearer token if set, into `cache_dir()/weights/hf/ORG/REPO/REVISION/FILE`;
/// - `s3://`, `gs://`, `az://`, `azure://`, `memory://` URLs: fetched through a
///   [`Location`] into `cache_dir()/weights/store/<sha256 of the URL>/<file name>`.
///
/// A cached file is reused without network access while its sha256 matches the one recorded
/// next to it (`FILE.sha256`). The first rank to get here downloads; other processes sharing
/// the cache wait for it and then reuse the file.
pub fn resolve_weights(spec: &str) -> Result<PathBuf> {
    match scheme_of(spec) {
        None => existing_file(PathBuf::from(spec)),
        Some("file") => existing_file(file_url_path(spec)?),
        Some("hf") => HfFile::parse(spec)?.fetch(),
        Some(scheme) if STORE_SCHEMES.contains(&scheme) => fetch_from_store(spec),
        Some(_) => Err(Error::UnsupportedUrl(spec.to_string())),
    }
}

/// Why [`resolve_weights`] cannot fetch `spec`, or `None` when it can try (a local path, or a
/// URL of `hf://` or one of [`STORE_SCHEMES`]). Nothing is opened: this is the job check.
pub fn weights_scheme_problem(spec: &str) -> Option<String> {
    let accepted: Vec<&str> = std::iter::once("hf")
        .chain(STORE_SCHEMES.iter().copied())
        .collect();
    unsupported_scheme(spec, &accepted)
}

fn file_url_path(spec: &str) -> Result<PathBuf> {
    Url::parse(spec)
        .ok()
        .and_then(|url| url.to_file_path().ok())
        .ok_or_else(|| Error::UnsupportedUrl(spec.to_string()))
}

fn existing_file(path: PathBuf) -> Result<PathBuf> {
    let meta = fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
    if meta.is_dir() {
        let reason = io::Error::new(
            io::ErrorKind::InvalidInput,
            "is a directory, expected a safetensors file",
        );
        return Err(Error::io(&path, reason));
    }
    Ok(path)
}

// ---------------------------------------------------------------------------------------------
// Cache entries shared by every remote source
// ---------------------------------------------------------------------------------------------

/// Makes `dest` hold a verified copy of a remote file. `fetch` fills (or resumes) the `.part`
/// file it is given and returns the sha256 the source announced, if any.
fn fetch_cached(
    dest: &Path,
    source: &str,
    fetch: impl FnOnce(&Path) -> Result<Option<String>>,
) -> Result<PathBuf> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let _lock = lock_entry(dest, source)?;
    if cached_copy_is_intact(dest)? {
        info!(source, file = %dest.display(), "using cached weights");
        return Ok(dest.to_path_buf());
    }
    let part = sidecar(dest, "part");
    let announced = fetch(&part)?;
    let found = sha256_of_file(&part)?;
    if let Some(expected) = announced {
        if expected != found {
            // A corrupt partial must not be resumed, or every retry would fail the same way.
            let _ = fs::remove_file(&part);
            return Err(Error::Checksum {
                what: source.to_string(),
                expected,
                found,
            });
        }
    }
    // The checksum goes first, so that a file under the final name always has one.
    write_atomically(&sidecar(dest, "sha256"), found.as_bytes())?;
    fs::rename(&part, dest).map_err(|e| Error::io(dest, e))?;
    info!(source, file = %dest.display(), sha256 = %found, "weights downloaded");
    Ok(dest.to_path_buf())
}

/// Serialises downloads of one cache entry across processes (ranks sharing a node).
pub(crate) fn lock_entry(dest: &Path, source: &str) -> Result<File> {
    let path = sidecar(dest, "lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    if file.try_lock().is_err() {
        info!(
            source,
            "another process is fetching these weights; waiting for it"
        );
        file.lock().map_err(|e| Error::io(&path, e))?;
    }
    Ok(file)
}

fn cached_copy_is_intact(dest: &Path) -> Result<bool> {
    if !dest.is_file() {
        return Ok(false);
    }
    let recorded = fs::read_to_string(sidecar(dest, "sha256")).ok();
    let Some(recorded) = recorded.map(|s| s.trim().to_string()) else {
        warn!(file = %dest.display(), "cached weights have no recorded sha256; downloading again");
        remove_if_present(dest)?;
        return Ok(false);
    };
    let found = sha256_of_file(dest)?;
    if found == recorded {
        return Ok(true);
    }
    warn!(
        file = %dest.display(),
        recorded = %recorded,
        found = %found,
        "cached weights no longer match their recorded sha256; downloading again"
    );
    remove_if_present(dest)?;
    Ok(false)
}

/// `dir/name` → `dir/name.ext`, keeping bookkeeping files next to the file they describe.
pub(crate) fn sidecar(path: &Path, ext: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(ext);
    path.with_file_name(name)
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = sidecar(path, "tmp");
    fs::write(&tmp, contents).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

fn file_len(path: &Path) -> Result<u64> {
    match fs::metadata(path) {
        Ok(meta) => Ok(meta.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Opens the `.part` file to continue at `offset` (appending) or to start over (`offset == 0`).
fn open_part(part: &Path, offset: u64) -> Result<File> {
    let mut options = OpenOptions::new();
    if offset > 0 {
        options.append(true);
    } else {
        options.create(true).write(true).truncate(true);
    }
    options.open(part).map_err(|e| Error::io(part, e))
}

fn sha256_of_file(path: &Path) -> Result<String> {
    digest_file::<Sha256>(path)
}

/// Hex digest of a file's contents, read in 1 MiB pieces (multi-GB files stay out of memory).
pub fn digest_file<D: sha2::Digest>(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = D::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(hex::encode(hasher.finalize())),
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
}

/// Logs bytes and throughput every few seconds, so a slow multi-GB download is visibly alive.
struct Progress<'a> {
    source: &'a str,
    done: u64,
    total: Option<u64>,
    resumed_at: u64,
    started: Instant,
    last_log: Instant,
}

impl<'a> Progress<'a> {
    fn new(source: &'a str, resumed_at: u64, total: Option<u64>) -> Self {
        let now = Instant::now();
        Self {
            source,
            done: resumed_at,
            total,
            resumed_at,
            started: now,
            last_log: now,
        }
    }

    fn advance(&mut self, bytes: usize) {
        self.done += bytes as u64;
        if self.last_log.elapsed() >= PROGRESS_EVERY {
            self.last_log = Instant::now();
            self.log("downloading");
        }
    }

    fn log(&self, message: &str) {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-6);
        let mb_per_s = (self.done - self.resumed_at) as f64 / 1e6 / seconds;
        info!(
            source = self.source,
            bytes = self.done,
            total = ?self.total,
            mb_per_s = format_args!("{mb_per_s:.1}"),
            "{message}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Hugging Face Hub
// ---------------------------------------------------------------------------------------------

struct HfFile {
    org: String,
    repo: String,
    file: String,
    revision: String,
}

impl HfFile {
    fn parse(spec: &str) -> Result<Self> {
        let unsupported = || Error::UnsupportedUrl(spec.to_string());
        let rest = spec.strip_prefix("hf://").ok_or_else(unsupported)?;
        let (location, revision) = rest.split_once('@').unwrap_or((rest, HF_DEFAULT_REVISION));
        let mut parts = location.splitn(3, '/');
        let (Some(org), Some(repo)) = (parts.next(), parts.next()) else {
            return Err(unsupported());
        };
        let file = parts
            .next()
            .filter(|f| !f.is_empty())
            .unwrap_or(HF_DEFAULT_FILE);
        // These become cache directories: `..` or empty segments could escape the cache.
        let safe = [org, repo, file, revision]
            .iter()
            .all(|part| part.split('/').all(is_safe_segment));
        if !safe {
            return Err(unsupported());
        }
        Ok(Self {
            org: org.to_string(),
            repo: repo.to_string(),
            file: file.to_string(),
            revision: revision.to_string(),
        })
    }

    fn url(&self) -> String {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| HF_DEFAULT_ENDPOINT.to_string());
        // Branch names such as `refs/pr/1` are one path segment in the Hub's URL scheme.
        let revision = self.revision.replace('/', "%2F");
        format!(
            "{}/{}/{}/resolve/{}/{}",
            endpoint.trim_end_matches('/'),
            self.org,
            self.repo,
            revision,
            self.file
        )
    }

    fn cache_path(&self) -> PathBuf {
        let mut path = cache_dir().join("weights").join("hf");
        path.push(&self.org);
        path.push(&self.repo);
        path.extend(self.revision.split('/'));
        path.extend(self.file.split('/'));
        path
    }

    fn fetch(&self) -> Result<PathBuf> {
        let url = self.url();
        fetch_cached(&self.cache_path(), &url, |part| http_download(&url, part))
    }
}

fn is_safe_segment(segment: &str) -> bool {
    !segment.is_empty() && segment != "." && segment != ".." && !segment.contains('\\')
}

enum Attempt {
    Done { announced_sha256: Option<String> },
    StartOver,
}

/// Downloads `url` into `part`, continuing an existing `.part` with a Range request; returns
/// the sha256 the server announced, if any. The caller verifies and renames the result.
pub(crate) fn http_download(url: &str, part: &Path) -> Result<Option<String>> {
    let offset = file_len(part)?;
    if offset > 0 {
        info!(url, offset, "resuming partial download");
        if let Attempt::Done { announced_sha256 } = http_attempt(url, part, offset)? {
            return Ok(announced_sha256);
        }
        info!(
            url,
            "the partial download does not fit the remote file; starting over"
        );
    }
    match http_attempt(url, part, 0)? {
        Attempt::Done { announced_sha256 } => Ok(announced_sha256),
        Attempt::StartOver => Err(download_error(url, "server refused a full download")),
    }
}

fn http_attempt(url: &str, part: &Path, offset: u64) -> Result<Attempt> {
    let (response, announced_sha256) = http_get(url, offset)?;
    let status = response.status().as_u16();
    let resume = match status {
        200 => false,
        206 if offset > 0 && content_range_start(response.headers()) == Some(offset) => true,
        // 416: the partial is at least as long as the file, so it is not a prefix of it.
        206 | 416 if offset > 0 => return Ok(Attempt::StartOver),
        _ => return Err(status_error(url, status)),
    };
    if offset > 0 && !resume {
        info!(
            url,
            "server ignored the Range request; downloading from the start"
        );
    }
    let start = if resume { offset } else { 0 };
    let total = header_str(response.headers(), "content-length")
        .and_then(|len| len.parse::<u64>().ok())
        .map(|len| len + start);
    let body = response.into_body().into_reader();
    write_body(body, part, start, total, url)?;
    Ok(Attempt::Done { announced_sha256 })
}

fn write_body(
    mut body: impl Read,
    part: &Path,
    start: u64,
    total: Option<u64>,
    url: &str,
) -> Result<()> {
    let mut file = open_part(part, start)?;
    let mut progress = Progress::new(url, start, total);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let reason = format!(
                    "connection lost after {} of {} bytes (kept in {}; the next call resumes): {e}",
                    progress.done,
                    total.map_or("?".to_string(), |t| t.to_string()),
                    part.display()
                );
                return Err(download_error(url, reason));
            }
        };
        file.write_all(&buf[..n]).map_err(|e| Error::io(part, e))?;
        progress.advance(n);
    }
    // The rename that follows must never expose data still in the page cache after a crash.
    file.sync_all().map_err(|e| Error::io(part, e))?;
    progress.log("download complete");
    Ok(())
}

type HttpResponse = ureq::http::Response<ureq::Body>;

/// GET with redirects followed by hand, because the Hub announces the sha256
/// (`X-Linked-Etag`) on the redirect to its CDN, not on the CDN's answer.
fn http_get(url: &str, offset: u64) -> Result<(HttpResponse, Option<String>)> {
    let origin = Url::parse(url).map_err(|e| download_error(url, format!("invalid URL: {e}")))?;
    let token = hf_token();
    let mut current = origin.clone();
    let mut announced = None;
    for _ in 0..=MAX_REDIRECTS {
        let mut request = http_agent()
            .get(current.as_str())
            // A compressed body would make byte offsets for Range requests meaningless.
            .header("Accept-Encoding", "identity");
        if offset > 0 {
            request = request.header("Range", format!("bytes={offset}-"));
        }
        // CDN redirects carry their own signed credentials; the token must not leak there.
        if let Some(token) = token.as_deref().filter(|_| same_origin(&current, &origin)) {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let response = request
            .call()
            .map_err(|e| download_error(current.as_str(), e.to_string()))?;
        announced = announced.or_else(|| announced_sha256(response.headers()));
        if !response.status().is_redirection() {
            return Ok((response, announced));
        }
        let location = header_str(response.headers(), "location").ok_or_else(|| {
            download_error(
                url,
                format!("HTTP {} without a Location header", response.status()),
            )
        })?;
        current = current
            .join(location)
            .map_err(|e| download_error(url, format!("bad redirect to `{location}`: {e}")))?;
    }
    Err(download_error(
        url,
        format!("more than {MAX_REDIRECTS} redirects"),
    ))
}

fn http_agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            // Statuses and redirects are handled here, to name the cause and keep the etag.
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(30)))
            // A stalled transfer should fail (and be resumed later) rather than hang training.
            .timeout_per_read(Some(Duration::from_secs(120)))
            .user_agent(concat!("ditrun/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent()
    })
}

fn hf_token() -> Option<String> {
    std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

fn header_str<'h>(headers: &'h ureq::http::HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name)?.to_str().ok()
}

/// The Hub's etag of an LFS file is its sha256; any other etag (a git blob sha1, a CDN hash)
/// says nothing checkable and is ignored.
fn announced_sha256(headers: &ureq::http::HeaderMap) -> Option<String> {
    ["x-linked-etag", "etag"].iter().find_map(|name| {
        let value = header_str(headers, name)?.trim();
        let value = value.strip_prefix("W/").unwrap_or(value).trim_matches('"');
        let is_sha256 = value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit());
        is_sha256.then(|| value.to_ascii_lowercase())
    })
}

/// Start offset of `Content-Range: bytes START-END/TOTAL`.
fn content_range_start(headers: &ureq::http::HeaderMap) -> Option<u64> {
    let range = header_str(headers, "content-range")?.trim();
    let (start, _) = range.strip_prefix("bytes ")?.split_once('-')?;
    start.trim().parse().ok()
}

fn status_error(url: &str, status: u16) -> Error {
    let phrase = ureq::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let reason = match status {
        404 => format!("HTTP 404 {phrase}: file or repository not found (check ORG/REPO, the file name and the revision)"),
        401 | 403 if hf_token().is_some() => format!(
            "HTTP {status} {phrase}: the HF_TOKEN sent does not grant access to this repository (gated, private or missing)"
        ),
        // The Hub answers 401 for private and missing repos alike.
        401 | 403 => format!(
            "HTTP {status} {phrase}: the repository is gated, private or missing; set HF_TOKEN to a token with access"
        ),
        _ => format!("HTTP {status} {phrase}"),
    };
    download_error(url, reason)
}

fn download_error(url: &str, reason: impl Into<String>) -> Error {
    Error::Download {
        url: url.to_string(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Object stores
// ---------------------------------------------------------------------------------------------

fn fetch_from_store(url: &str) -> Result<PathBuf> {
    let location = Location::parse(url)?;
    let name = location
        .name()
        .ok_or_else(|| Error::UnsupportedUrl(url.to_string()))?;
    // Hashing the URL keeps keys from different buckets and stores apart without having to
    // mirror every store's naming rules in the cache layout.
    let key = hex::encode(Sha256::digest(url.as_bytes()));
    let dest = cache_dir()
        .join("weights")
        .join("store")
        .join(key)
        .join(name);
    fetch_cached(&dest, url, |part| store_download(&location, url, part))
}

/// Copies the object into `part` in ranges, resuming only if the object is still the version
/// the partial came from (its etag is kept in `FILE.part.etag`).
fn store_download(location: &Location, url: &str, part: &Path) -> Result<Option<String>> {
    let meta = location.head()?;
    let version_file = sidecar(part, "etag");
    let mut offset = file_len(part)?;
    let same_version = fs::read_to_string(&version_file).ok() == meta.e_tag;
    if offset > 0 && (offset > meta.size || !same_version) {
        info!(
            url,
            "object changed since the partial download; starting over"
        );
        offset = 0;
    }
    if offset == 0 {
        remove_if_present(&version_file)?;
        if let Some(etag) = &meta.e_tag {
            write_atomically(&version_file, etag.as_bytes())?;
        }
    } else {
        info!(url, offset, "resuming partial download");
    }
    let mut file = open_part(part, offset)?;
    let mut progress = Progress::new(url, offset, Some(meta.size));
    while offset < meta.size {
        let end = (offset + STORE_CHUNK).min(meta.size);
        // A mid-download overwrite must fail rather than splice two versions together.
        let bytes = location.get_range(offset..end, meta.e_tag.clone())?;
        if bytes.is_empty() {
            return Err(download_error(
                url,
                format!("object ended at byte {offset} of {}", meta.size),
            ));
        }
        file.write_all(&bytes).map_err(|e| Error::io(part, e))?;
        offset += bytes.len() as u64;
        progress.advance(bytes.len());
    }
    file.sync_all().map_err(|e| Error::io(part, e))?;
    progress.log("download complete");
    remove_if_present(&version_file)?;
    Ok(None)
}
