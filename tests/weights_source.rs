//! `resolve_weights` against a local HTTP server that plays the Hugging Face Hub (resolve URLs,
//! `X-Linked-Etag`, Range requests, dropped connections) and against the in-memory object store.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use ditrun::error::Error;
use ditrun::storage::{block_on, object_store_for, resolve_weights};
use object_store::{ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

const CLIP_ROUTE: &str = "/openai/clip-tiny/resolve/main/model.safetensors";

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 file server
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Route {
    body: Vec<u8>,
    /// Sent as `X-Linked-Etag`, the way the Hub announces an LFS file's sha256.
    announced_sha256: Option<String>,
    /// Answer 302 to this URL instead of serving `body`, as the Hub does for its CDN.
    redirect: Option<String>,
}

impl Route {
    fn honest(body: Vec<u8>) -> Self {
        let announced_sha256 = Some(sha256_hex(&body));
        Self {
            body,
            announced_sha256,
            redirect: None,
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Behaviour {
    /// Close the connection after this many body bytes of the very first request.
    cut_first_response_after: Option<usize>,
    /// Answer every request with the whole file (200), as servers without Range support do.
    ignore_range: bool,
}

#[derive(Clone, Debug)]
struct Seen {
    path: String,
    range: Option<String>,
    authorization: Option<String>,
}

struct State {
    routes: HashMap<String, Route>,
    behaviour: Behaviour,
    seen: Mutex<Vec<Seen>>,
}

struct TestServer {
    base: String,
    state: Arc<State>,
}

impl TestServer {
    fn start(routes: HashMap<String, Route>, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind test server");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State {
            routes,
            behaviour,
            seen: Mutex::new(Vec::new()),
        });
        let shared = state.clone();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                thread::spawn(move || {
                    let _ = serve(stream, &state);
                });
            }
        });
        Self { base, state }
    }

    fn requests(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

fn serve(mut stream: TcpStream, state: &State) -> io::Result<()> {
    let head = read_head(&mut stream)?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split_whitespace();
    let (method, path) = (
        request_line.next().unwrap_or(""),
        request_line.next().unwrap_or(""),
    );
    let headers: HashMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    let is_first = {
        let mut seen = state.seen.lock().unwrap();
        seen.push(Seen {
            path: path.to_string(),
            range: headers.get("range").cloned(),
            authorization: headers.get("authorization").cloned(),
        });
        seen.len() == 1
    };

    if method != "GET" {
        return respond(&mut stream, "405 Method Not Allowed", &[], b"");
    }
    let Some(route) = state.routes.get(path) else {
        return respond(&mut stream, "404 Not Found", &[], b"Entry not found");
    };
    // Every answer about an existing file carries the Hub's checksum header, redirects included.
    let mut extra: Vec<(String, String)> = route
        .announced_sha256
        .iter()
        .map(|sha| ("X-Linked-Etag".to_string(), format!("\"{sha}\"")))
        .collect();
    if let Some(target) = &route.redirect {
        extra.push(("Location".to_string(), target.clone()));
        return respond(&mut stream, "302 Found", &extra, b"");
    }
    let len = route.body.len();
    let offset = headers
        .get("range")
        .filter(|_| !state.behaviour.ignore_range)
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|start| start.parse::<usize>().ok());

    let (status, body) = match offset {
        Some(start) if start >= len => {
            let range = ("Content-Range".to_string(), format!("bytes */{len}"));
            return respond(&mut stream, "416 Range Not Satisfiable", &[range], b"");
        }
        Some(start) => {
            let range = format!("bytes {start}-{}/{len}", len - 1);
            extra.push(("Content-Range".to_string(), range));
            ("206 Partial Content", &route.body[start..])
        }
        None => ("200 OK", &route.body[..]),
    };
    match state
        .behaviour
        .cut_first_response_after
        .filter(|_| is_first)
    {
        Some(cut) => {
            write_head(&mut stream, status, &extra, body.len())?;
            stream.write_all(&body[..cut])?;
            stream.flush()?;
            stream.shutdown(Shutdown::Both)
        }
        None => respond(&mut stream, status, &extra, body),
    }
}

fn read_head(stream: &mut TcpStream) -> io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn write_head(
    stream: &mut TcpStream,
    status: &str,
    extra: &[(String, String)],
    content_length: usize,
) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {content_length}\r\nContent-Type: application/octet-stream\r\nAccept-Ranges: bytes\r\nConnection: close\r\n"
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    extra: &[(String, String)],
    body: &[u8],
) -> io::Result<()> {
    write_head(stream, status, extra, body.len())?;
    stream.write_all(body)?;
    stream.flush()
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// Env vars are process-wide and tests run on parallel threads.
static ENV_LOCK: Mutex<()> = Mutex::new(());

struct TestEnv {
    cache: TempDir,
    _guard: MutexGuard<'static, ()>,
}

impl TestEnv {
    fn new(hf_endpoint: Option<&str>) -> Self {
        let guard = ENV_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let cache = tempfile::tempdir().expect("cache tempdir");
        std::env::set_var("DITRUN_CACHE_DIR", cache.path());
        std::env::remove_var("HF_TOKEN");
        match hf_endpoint {
            Some(endpoint) => std::env::set_var("HF_ENDPOINT", endpoint),
            None => std::env::remove_var("HF_ENDPOINT"),
        }
        Self {
            cache,
            _guard: guard,
        }
    }

    fn hf_path(&self, relative: &str) -> PathBuf {
        self.cache.path().join("weights/hf").join(relative)
    }
}

fn reference_weights() -> Vec<u8> {
    let dir = std::env::var_os("DITRUN_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference"));
    let file = dir.join("clip_tiny/model.safetensors");
    fs::read(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn clip_server(behaviour: Behaviour) -> (TestServer, Vec<u8>) {
    let bytes = reference_weights();
    let routes = HashMap::from([(CLIP_ROUTE.to_string(), Route::honest(bytes.clone()))]);
    (TestServer::start(routes, behaviour), bytes)
}

// ---------------------------------------------------------------------------------------------
// Hugging Face downloads
// ---------------------------------------------------------------------------------------------

#[test]
fn hf_download_records_sha256_and_second_call_stays_offline() {
    let (server, source) = clip_server(Behaviour::default());
    let env = TestEnv::new(Some(&server.base));

    let path = resolve_weights("hf://openai/clip-tiny").expect("download");

    assert_eq!(path, env.hf_path("openai/clip-tiny/main/model.safetensors"));
    assert_eq!(fs::read(&path).unwrap(), source);
    let recorded = fs::read_to_string(with_suffix(&path, ".sha256")).unwrap();
    assert_eq!(recorded, sha256_hex(&source));
    assert!(!with_suffix(&path, ".part").exists());
    assert_eq!(server.requests().len(), 1);
    assert_eq!(server.requests()[0].path, CLIP_ROUTE);

    let again = resolve_weights("hf://openai/clip-tiny").expect("cached");
    assert_eq!(again, path);
    assert_eq!(
        server.requests().len(),
        1,
        "a verified cached file needs no request"
    );
}

#[test]
fn hf_file_and_revision_select_url_and_cache_path() {
    let bytes = reference_weights();
    let route = "/org/repo/resolve/v1.0/text_encoder/weights.safetensors";
    let server = TestServer::start(
        HashMap::from([(route.to_string(), Route::honest(bytes.clone()))]),
        Behaviour::default(),
    );
    let env = TestEnv::new(Some(&server.base));

    let path = resolve_weights("hf://org/repo/text_encoder/weights.safetensors@v1.0").unwrap();

    assert_eq!(
        path,
        env.hf_path("org/repo/v1.0/text_encoder/weights.safetensors")
    );
    assert_eq!(fs::read(&path).unwrap(), bytes);
    assert_eq!(server.requests()[0].path, route);
}

#[test]
fn interrupted_download_resumes_with_range_request() {
    let bytes = reference_weights();
    let half = bytes.len() / 2;
    let (server, source) = clip_server(Behaviour {
        cut_first_response_after: Some(half),
        ..Default::default()
    });
    let env = TestEnv::new(Some(&server.base));
    let dest = env.hf_path("openai/clip-tiny/main/model.safetensors");

    let err = resolve_weights("hf://openai/clip-tiny").expect_err("the connection was cut");
    assert!(matches!(err, Error::Download { .. }), "{err}");
    assert!(
        !dest.exists(),
        "a partial download must not appear under the final name"
    );
    assert_eq!(
        fs::metadata(with_suffix(&dest, ".part")).unwrap().len(),
        half as u64
    );

    let path = resolve_weights("hf://openai/clip-tiny").expect("resumed download");

    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].range, None);
    assert_eq!(requests[1].range, Some(format!("bytes={half}-")));
    assert_eq!(fs::read(&path).unwrap(), source);
    assert_eq!(
        fs::read_to_string(with_suffix(&path, ".sha256")).unwrap(),
        sha256_hex(&source)
    );
    assert!(!with_suffix(&path, ".part").exists());
}

#[test]
fn server_ignoring_range_restarts_from_zero() {
    let bytes = reference_weights();
    let cut = bytes.len() / 3;
    let (server, source) = clip_server(Behaviour {
        cut_first_response_after: Some(cut),
        ignore_range: true,
    });
    let _env = TestEnv::new(Some(&server.base));

    resolve_weights("hf://openai/clip-tiny").expect_err("the connection was cut");
    let path = resolve_weights("hf://openai/clip-tiny").expect("full download");

    assert_eq!(server.requests()[1].range, Some(format!("bytes={cut}-")));
    assert_eq!(
        fs::read(&path).unwrap(),
        source,
        "the 200 body replaces the partial"
    );
}

#[test]
fn wrong_announced_checksum_fails_and_leaves_no_file() {
    let bytes = reference_weights();
    let other: Vec<u8> = bytes.iter().rev().copied().collect();
    let route = Route {
        body: bytes.clone(),
        announced_sha256: Some(sha256_hex(&other)),
        redirect: None,
    };
    let server = TestServer::start(
        HashMap::from([(CLIP_ROUTE.to_string(), route)]),
        Behaviour::default(),
    );
    let env = TestEnv::new(Some(&server.base));
    let dest = env.hf_path("openai/clip-tiny/main/model.safetensors");

    let err = resolve_weights("hf://openai/clip-tiny").expect_err("checksum mismatch");

    match &err {
        Error::Checksum {
            expected, found, ..
        } => {
            assert_eq!(expected, &sha256_hex(&other));
            assert_eq!(found, &sha256_hex(&bytes));
        }
        other => panic!("expected Error::Checksum, got {other}"),
    }
    assert!(!dest.exists());
    assert!(
        !with_suffix(&dest, ".part").exists(),
        "a corrupt partial must not be resumed"
    );
    assert!(!with_suffix(&dest, ".sha256").exists());
}

/// The Hub answers a resolve URL with a redirect to its CDN and announces the sha256 only on
/// that redirect; the token is for the Hub and must not travel to the CDN.
#[test]
fn hub_redirect_announces_checksum_and_keeps_token_from_cdn() {
    let bytes = reference_weights();
    let cdn = TestServer::start(
        HashMap::from([(
            "/cdn/blob".to_string(),
            Route {
                announced_sha256: None,
                ..Route::honest(bytes.clone())
            },
        )]),
        Behaviour::default(),
    );
    let other: Vec<u8> = bytes.iter().rev().copied().collect();
    let hub_route = |announced: &[u8]| Route {
        body: Vec::new(),
        announced_sha256: Some(sha256_hex(announced)),
        redirect: Some(format!("{}/cdn/blob", cdn.base)),
    };
    let honest_hub = TestServer::start(
        HashMap::from([(CLIP_ROUTE.to_string(), hub_route(&bytes))]),
        Behaviour::default(),
    );
    let lying_hub = TestServer::start(
        HashMap::from([(CLIP_ROUTE.to_string(), hub_route(&other))]),
        Behaviour::default(),
    );
    let _env = TestEnv::new(Some(&lying_hub.base));
    let token = format!("hf_test_{}", std::process::id());
    std::env::set_var("HF_TOKEN", &token);

    let lied_to = resolve_weights("hf://openai/clip-tiny");
    std::env::set_var("HF_ENDPOINT", &honest_hub.base);
    let honest = resolve_weights("hf://openai/clip-tiny");
    std::env::remove_var("HF_TOKEN");

    assert!(
        matches!(lied_to, Err(Error::Checksum { .. })),
        "{lied_to:?}"
    );
    assert_eq!(fs::read(honest.expect("verified download")).unwrap(), bytes);
    let bearer = Some(format!("Bearer {token}"));
    assert_eq!(lying_hub.requests()[0].authorization, bearer);
    assert_eq!(honest_hub.requests()[0].authorization, bearer);
    let cdn_requests = cdn.requests();
    assert_eq!(cdn_requests.len(), 2);
    assert!(cdn_requests.iter().all(|r| r.authorization.is_none()));
}

#[test]
fn missing_file_reports_url_and_404() {
    let (server, _) = clip_server(Behaviour::default());
    let _env = TestEnv::new(Some(&server.base));

    let err = resolve_weights("hf://openai/no-such-repo").expect_err("404");

    let url = format!(
        "{}/openai/no-such-repo/resolve/main/model.safetensors",
        server.base
    );
    let message = err.to_string();
    assert!(matches!(err, Error::Download { .. }), "{message}");
    assert!(message.contains(&url), "{message}");
    assert!(message.contains("404"), "{message}");
}

#[test]
fn hf_token_is_sent_as_bearer() {
    let (server, _) = clip_server(Behaviour::default());
    let _env = TestEnv::new(Some(&server.base));
    let token = format!("hf_test_{}", std::process::id());
    std::env::set_var("HF_TOKEN", &token);

    let result = resolve_weights("hf://openai/clip-tiny");
    std::env::remove_var("HF_TOKEN");

    result.expect("download");
    assert_eq!(
        server.requests()[0].authorization,
        Some(format!("Bearer {token}"))
    );
}

#[test]
fn tampered_cache_is_downloaded_again() {
    let (server, source) = clip_server(Behaviour::default());
    let _env = TestEnv::new(Some(&server.base));
    let path = resolve_weights("hf://openai/clip-tiny").unwrap();
    let mut tampered = source.clone();
    tampered[source.len() / 2] ^= 0xff;
    fs::write(&path, &tampered).unwrap();

    let again = resolve_weights("hf://openai/clip-tiny").unwrap();

    assert_eq!(
        server.requests().len(),
        2,
        "the changed file must be fetched again"
    );
    assert_eq!(fs::read(&again).unwrap(), source);
}

// ---------------------------------------------------------------------------------------------
// Object stores and local paths
// ---------------------------------------------------------------------------------------------

#[test]
fn memory_url_is_fetched_into_cache() {
    let env = TestEnv::new(None);
    let bytes = reference_weights();
    let url = "memory://weights_source/clip/model.safetensors";
    let (store, path) = object_store_for(url).unwrap();
    block_on(store.put(&path, PutPayload::from(bytes.clone()))).unwrap();

    let local = resolve_weights(url).expect("fetch from memory store");

    assert!(local.starts_with(env.cache.path().join("weights/store")));
    assert_eq!(local.file_name().unwrap(), "model.safetensors");
    assert_eq!(fs::read(&local).unwrap(), bytes);
    assert_eq!(
        fs::read_to_string(with_suffix(&local, ".sha256")).unwrap(),
        sha256_hex(&bytes)
    );
}

#[test]
fn missing_memory_object_is_an_object_store_error() {
    let _env = TestEnv::new(None);
    let url = "memory://weights_source/absent/model.safetensors";

    let err = resolve_weights(url).expect_err("nothing stored there");

    assert!(matches!(err, Error::ObjectStore { .. }), "{err}");
    assert!(err.to_string().contains(url), "{err}");
}

#[test]
fn local_path_and_file_url_resolve_to_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    fs::write(&file, b"weights").unwrap();
    let file_url = url::Url::from_file_path(&file).unwrap().to_string();

    assert_eq!(resolve_weights(file.to_str().unwrap()).unwrap(), file);
    assert_eq!(resolve_weights(&file_url).unwrap(), file);
}

#[test]
fn missing_local_path_is_named_in_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.safetensors");
    let missing = missing.to_str().unwrap();

    let err = resolve_weights(missing).expect_err("no such file");

    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains(missing), "{err}");
}

#[test]
fn unsupported_scheme_is_rejected() {
    let err = resolve_weights("ftp://x").expect_err("ftp is not a weights source");

    assert!(
        matches!(err, Error::UnsupportedUrl(ref s) if s == "ftp://x"),
        "{err}"
    );
}

/// The whole path a job takes: `text_encoder.weights: hf://...` → download → CLIP text model,
/// whose outputs are then those of the reference vectors.
#[test]
fn clip_encoder_loads_through_hf_url_and_matches_reference() {
    use burn::prelude::*;
    use ditrun::model::weights::SafetensorsFile;
    use ditrun::model::ClipTextConfig;
    use ditrun::text::TextEncoder;
    type B = burn::backend::Flex;

    let (server, _) = clip_server(Behaviour::default());
    let _env = TestEnv::new(Some(&server.base));
    let reference = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference");
    let reference = std::env::var_os("DITRUN_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or(reference);
    let config_text = fs::read_to_string(reference.join("clip_tiny/config.json")).unwrap();
    let config = ClipTextConfig::from_hf_json(&serde_json::from_str(&config_text).unwrap());
    let device = Default::default();

    let encoder =
        TextEncoder::<B>::load(Some("hf://openai/clip-tiny"), &config, 0, &device).unwrap();

    let expected =
        SafetensorsFile::read(&reference.join("clip_tiny/expected.safetensors")).unwrap();
    let ids = Tensor::<B, 2, Int>::from_data(
        expected.tensor("input_ids").unwrap().convert::<i64>(),
        &device,
    );
    let pooled: Vec<f32> = encoder
        .model
        .forward(ids)
        .pooler_output
        .into_data()
        .into_vec()
        .unwrap();
    let reference_pooled: Vec<f32> = expected
        .tensor("pooler_output")
        .unwrap()
        .into_vec()
        .unwrap();
    let scale = reference_pooled.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = pooled
        .iter()
        .zip(&reference_pooled)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst / scale < 1e-4,
        "pooled output relative error {}",
        worst / scale
    );
    assert_eq!(server.requests().len(), 1);
}
