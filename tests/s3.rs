//! Shards and checkpoints on a real S3-compatible server (moto on 127.0.0.1) through
//! `object_store`'s S3 client with an endpoint override: streaming shards, exact resume over
//! S3, a server that stops mid-upload and comes back, and a store nobody answers at.
//!
//! `scripts/test.sh` starts moto and sets `DITRUN_S3_ENDPOINT`; without it these tests start
//! it themselves with `scripts/moto.sh start` (and leave it running for the next run).

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ditrun::checkpoint::{
    CheckpointOptions, CheckpointState, CheckpointStore, RetryPolicy, COMMIT_FILE,
};
use ditrun::config::JobSpec;
use ditrun::data::stream::{BatchStream, ObjectStoreShards, StreamOptions, StreamPosition};
use ditrun::data::{prepare_with, read_index, read_shard, DatasetKind, PrepareOptions};
use ditrun::storage::block_on;
use ditrun::train::{train, train_until, Resume, EMA_FILE, MODEL_FILE, OPTIMIZER_FILE};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};

const REGION: &str = "us-east-1";
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The shared server and buckets
// ---------------------------------------------------------------------------------------------

/// The shared moto endpoint, with the `AWS_*` variables that `object_store_for` reads pointed at
/// it. The environment is process-wide, so it is set once, before any test builds a store.
fn endpoint() -> &'static str {
    static ENDPOINT: OnceLock<String> = OnceLock::new();
    ENDPOINT.get_or_init(|| {
        let endpoint = std::env::var("DITRUN_S3_ENDPOINT")
            .ok()
            .filter(|endpoint| !endpoint.is_empty())
            .unwrap_or_else(start_shared_moto);
        for (key, value) in [
            ("AWS_ENDPOINT_URL", endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", REGION),
        ] {
            std::env::set_var(key, value);
        }
        endpoint
    })
}

fn start_shared_moto() -> String {
    let output = Command::new("bash")
        .arg(project_dir().join("scripts/moto.sh"))
        .arg("start")
        .stderr(Stdio::inherit())
        .output()
        .expect("cannot run scripts/moto.sh");
    assert!(output.status.success(), "scripts/moto.sh start failed");
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

fn project_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A bucket no other test (or earlier run against the same server) uses.
fn new_bucket(endpoint: &str, purpose: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let bucket = format!(
        "ditrun-{purpose}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    // moto creates a bucket on a plain, unsigned PUT.
    ureq::put(&format!("{endpoint}/{bucket}"))
        .send_empty()
        .unwrap_or_else(|e| panic!("creating bucket {bucket} at {endpoint}: {e}"));
    bucket
}

/// An S3 client for one bucket with its own timeouts and retries (the env-configured one of
/// `object_store_for` retries a dead connection for about a minute).
fn s3_store(
    endpoint: &str,
    bucket: &str,
    timeout: Duration,
    max_retries: usize,
) -> Arc<dyn ObjectStore> {
    let store = AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_bucket_name(bucket)
        .with_region(REGION)
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .with_client_options(
            ClientOptions::new()
                .with_allow_http(true)
                .with_timeout(timeout)
                .with_connect_timeout(timeout),
        )
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(50),
                base: 2.0,
            },
            max_retries,
            retry_timeout: timeout * 2,
        })
        .build()
        .unwrap();
    Arc::new(store)
}

fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        attempts: 2,
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(50),
    }
}

fn exists(store: &dyn ObjectStore, path: &str) -> bool {
    match block_on(store.head(&Path::from(path))) {
        Ok(_) => true,
        Err(object_store::Error::NotFound { .. }) => false,
        Err(e) => panic!("HEAD {path}: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// A tiny training job (as in tests/train.rs) with its data and checkpoints on S3
// ---------------------------------------------------------------------------------------------

fn tiny_job_yaml(shards: &str, checkpoints: &str, local: &FsPath, steps: u64) -> String {
    format!(
        r#"
name: tiny-s3
model: {{ image_size: 8, patch_size: 4, channels: 3, dim: 16, depth: 1, heads: 2, mlp_ratio: 2.0, context_dim: 32 }}
text_encoder: {{ hidden_size: 32, intermediate_size: 64, layers: 2, heads: 2 }}
data:
  shards: {shards}
  prepare: {{ dataset: synthetic, samples: 64, samples_per_shard: 16 }}
  shuffle_window: 2
  prefetch: 2
train: {{ steps: {steps}, batch_size: 8, lr: 1.0e-3, warmup_steps: 2, grad_clip: 1.0, ema_decay: 0.9, seed: 7, text_drop_prob: 0.2, backend: auto, threads: 2 }}
checkpoint: {{ url: {checkpoints}, every_steps: 2, keep_last: 3 }}
logging: {{ dir: {local}/tensorboard, every_steps: 1 }}
sample: {{ every_steps: 0, at_end: false }}
"#,
        local = local.display()
    )
}

fn tiny_job(shards: &str, checkpoints: &str, local: &FsPath, steps: u64) -> JobSpec {
    JobSpec::from_yaml(
        &tiny_job_yaml(shards, checkpoints, local, steps),
        "tiny-s3.yaml",
    )
    .expect("the test job is valid")
}

fn model_bytes(checkpoints: &str, step: u64) -> Bytes {
    let store = CheckpointStore::open(checkpoints, 0).unwrap();
    store.load(step).unwrap().files[MODEL_FILE].clone()
}

// ---------------------------------------------------------------------------------------------
// Shards
// ---------------------------------------------------------------------------------------------

/// A batch sample turned back into the shard's bytes: channels-first `[-1, 1]` floats →
/// channels-last `u8`, so it can be compared with what `read_shard` decodes.
fn sample_bytes(pixels: &[f32], size: usize, channels: usize) -> Vec<u8> {
    let plane = size * size;
    (0..plane * channels)
        .map(|i| {
            let (pixel, channel) = (i / channels, i % channels);
            ((pixels[channel * plane + pixel] + 1.0) * 127.5).round() as u8
        })
        .collect()
}

#[test]
fn shards_streamed_from_s3_yield_every_sample_once_per_epoch() {
    let endpoint = endpoint();
    let prefix = format!("s3://{}/shards", new_bucket(endpoint, "shards"));
    let mut options = PrepareOptions::new(DatasetKind::Synthetic, &prefix);
    options.samples = Some(40);
    options.samples_per_shard = 8;
    options.image_size = Some(8);
    let written = prepare_with(&options).unwrap();

    let index = read_index(&prefix).unwrap();
    assert_eq!(index, written);
    assert_eq!((index.shards.len(), index.total_samples), (5, 40));
    let mut expected: Vec<(String, i64, Vec<u8>)> = (0..index.shards.len())
        .flat_map(|shard| read_shard(&prefix, &index, shard).unwrap())
        .map(|sample| (sample.caption, sample.label, sample.pixels))
        .collect();
    expected.sort();

    let source = Arc::new(ObjectStoreShards::open(&prefix).unwrap());
    let stream_options = StreamOptions {
        seed: 3,
        global_batch: 8,
        shuffle_window: 2,
        prefetch_batches: 2,
        decode_threads: 2,
        ..StreamOptions::default()
    };
    let mut stream = BatchStream::new(source, stream_options, StreamPosition::default()).unwrap();
    let mut orders = Vec::new();
    for epoch in 0..2 {
        let mut seen = Vec::new();
        for _ in 0..index.total_samples / 8 {
            let batch = stream.next_batch().unwrap();
            assert_eq!(batch.start.epoch, epoch);
            let sample_len = index.image_size * index.image_size * index.channels;
            for (i, pixels) in batch.pixels.chunks(sample_len).enumerate() {
                let bytes = sample_bytes(pixels, index.image_size, index.channels);
                seen.push((batch.captions[i].clone(), batch.labels[i], bytes));
            }
        }
        orders.push(seen.clone());
        seen.sort();
        assert!(
            seen == expected,
            "epoch {epoch} does not hold every sample exactly once"
        );
    }
    assert_ne!(orders[0], orders[1], "each epoch is shuffled differently");
}

#[test]
#[ignore = "benchmark: scripts/test.sh --test s3 -- --ignored --nocapture stream_throughput_s3"]
fn stream_throughput_s3() {
    let endpoint = endpoint();
    let prefix = format!("s3://{}/bench", new_bucket(endpoint, "bench"));
    let samples = 20_480;
    let mut options = PrepareOptions::new(DatasetKind::Synthetic, &prefix);
    options.samples = Some(samples);
    options.samples_per_shard = 1024;
    options.image_size = Some(32);
    prepare_with(&options).unwrap();
    let source = Arc::new(ObjectStoreShards::open(&prefix).unwrap());
    let stream_options = StreamOptions {
        seed: 0,
        global_batch: 256,
        shuffle_window: 4,
        prefetch_batches: 4,
        decode_threads: 1,
        ..StreamOptions::default()
    };
    let batches = samples / 256;
    let cpu_before = common::process_cpu_seconds();
    let started = Instant::now();
    let mut stream = BatchStream::new(source, stream_options, StreamPosition::default()).unwrap();
    for _ in 0..batches {
        stream.next_batch().unwrap();
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_before
        .zip(common::process_cpu_seconds())
        .map(|(a, b)| b - a)
        .unwrap_or(f64::NAN);
    println!(
        "stream_throughput_s3: {:.0} images/s from moto at {endpoint} (decode_threads = 1, 32x32x3, \
         {batches} batches of 256, {wall:.2} s wall); ditrun's process CPU {cpu:.2} s -> {:.0} images per CPU-second",
        (batches * 256) as f64 / wall,
        (batches * 256) as f64 / cpu
    );
}

// ---------------------------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------------------------

#[test]
fn checkpoints_on_s3_resume_to_bit_identical_weights() {
    let endpoint = endpoint();
    let bucket = new_bucket(endpoint, "resume");
    let local = tempfile::tempdir().unwrap();
    let shards = format!("s3://{bucket}/shards");
    let straight = format!("s3://{bucket}/straight");
    let interrupted = format!("s3://{bucket}/interrupted");

    // The first run prepares the shards on S3 (they are missing); the others reuse them.
    let outcome = train(
        &tiny_job(&shards, &straight, local.path(), 4),
        &Resume::Never,
    )
    .unwrap();
    assert_eq!(outcome.steps_done, 4);
    assert!(
        read_index(&shards).is_ok(),
        "the job prepared its shards on S3"
    );

    let stopped = train_until(
        &tiny_job(&shards, &interrupted, local.path(), 4),
        &Resume::Never,
        Some(2),
    )
    .unwrap();
    assert_eq!(stopped.steps_done, 2);
    let resumed = train(
        &tiny_job(&shards, &interrupted, local.path(), 4),
        &Resume::Auto,
    )
    .unwrap();
    assert_eq!(resumed.resumed_from, Some(2));
    assert_eq!(resumed.steps_done, 4);

    let committed = CheckpointStore::open(&interrupted, 0)
        .unwrap()
        .list_committed()
        .unwrap();
    assert_eq!(committed, [2, 4]);
    assert!(
        model_bytes(&straight, 4) == model_bytes(&interrupted, 4),
        "weights after the resume differ"
    );
}

/// A moto server of this test's own, killed when dropped.
struct PrivateMoto {
    child: Child,
    endpoint: String,
}

impl PrivateMoto {
    fn start() -> Self {
        let python = Command::new("bash")
            .arg(project_dir().join("scripts/python-venv.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("cannot run scripts/python-venv.sh");
        assert!(python.status.success(), "scripts/python-venv.sh failed");
        let python = PathBuf::from(String::from_utf8(python.stdout).unwrap().trim());
        let port = free_port();
        let child = Command::new(python.with_file_name("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start moto_server from the venv");
        let server = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        server.wait_until_it_answers();
        server
    }

    fn wait_until_it_answers(&self) {
        let started = Instant::now();
        while ureq::get(&self.endpoint).call().is_err() {
            assert!(
                started.elapsed() < SERVER_START_TIMEOUT,
                "moto at {} does not answer",
                self.endpoint
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} moto");
    }

    /// Stops the process where it is (SIGSTOP): clients connect but get no answer.
    fn pause(&self) {
        self.signal("-STOP");
    }

    fn resume(&self) {
        self.signal("-CONT");
        self.wait_until_it_answers();
    }
}

impl Drop for PrivateMoto {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nothing listens on (bound once to get it, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ditrun_command(endpoint: &str, job: &FsPath, steps: u64, resume: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ditrun"));
    command
        .arg("train")
        .arg("--job")
        .arg(job)
        .args(["--set", &format!("train.steps={steps}"), "--resume", resume])
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", REGION)
        .env("RUST_LOG", "warn");
    command
}

/// `ditrun train` as a separate process, so that it can talk to another server than this
/// process's `AWS_ENDPOINT_URL`; returns its outcome (the JSON it prints).
fn ditrun_train(endpoint: &str, job: &FsPath, steps: u64, resume: &str) -> serde_json::Value {
    let output = ditrun_command(endpoint, job, steps, resume)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "ditrun train failed:\n{stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let last_line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last_line)
        .unwrap_or_else(|e| panic!("outcome `{last_line}`: {e}\n{stderr}"))
}

/// The server stops while a checkpoint is uploading, and comes back; training goes on.
///
/// moto keeps its objects in memory only, so killing and restarting it would also wipe the
/// committed checkpoint and the shards, and the "restart" would test nothing but an empty
/// bucket. Instead the server process is stopped with SIGSTOP once the upload is under way:
/// from the client's side it is a server that stopped answering in the middle of a PUT (the
/// connection hangs, the request times out, the retries are spent); SIGCONT then brings the
/// same server back with its state, as a restarted durable store would be. (A server that is
/// gone altogether, connection refused, is the unreachable-store test below.)
///
/// Training runs as a `ditrun train` child process, because its store comes from the
/// `AWS_*` environment, which in this process names the shared server.
#[test]
fn a_server_stopped_mid_upload_leaves_no_half_checkpoint_and_training_goes_on() {
    let server = PrivateMoto::start();
    let bucket = new_bucket(&server.endpoint, "stopped");
    let local = tempfile::tempdir().unwrap();
    let checkpoints = format!("s3://{bucket}/ckpt");
    let job = local.path().join("job.yaml");
    std::fs::write(
        &job,
        tiny_job_yaml(
            &format!("s3://{bucket}/shards"),
            &checkpoints,
            local.path(),
            4,
        ),
    )
    .unwrap();

    let first = ditrun_train(&server.endpoint, &job, 2, "never");
    assert_eq!(first["steps_done"], 2);

    let store = CheckpointStore::from_store(
        s3_store(&server.endpoint, &bucket, Duration::from_secs(1), 0),
        Path::from("ckpt"),
        &checkpoints,
        CheckpointOptions {
            keep_last: 3,
            retry: quick_retries(),
        },
    );
    let observer = s3_store(&server.endpoint, &bucket, Duration::from_secs(5), 3);
    let good = store
        .latest_valid()
        .unwrap()
        .expect("the first run committed step 2");
    assert_eq!(good.state.step, 2);

    // Step 4 as the trainer would write it, plus a large file that is still uploading when
    // the server stops (it stands in for a real model's optimiser state). It is large enough
    // (256 MiB) that its upload cannot finish between the small files landing and the pause,
    // however busy the machine.
    let mut files: Vec<(String, Bytes)> = [MODEL_FILE, EMA_FILE, OPTIMIZER_FILE]
        .iter()
        .map(|name| (name.to_string(), good.files[*name].clone()))
        .collect();
    files.push(("large.bin".into(), Bytes::from(vec![7u8; 256 << 20])));
    let state = CheckpointState {
        step: 4,
        created_unix: 0,
        files: BTreeMap::new(),
        ..good.state.clone()
    };
    let saving = store.save_async(state, files).unwrap();
    let last_small = format!("ckpt/step-000000004/{OPTIMIZER_FILE}");
    let started = Instant::now();
    while !exists(&*observer, &last_small) {
        assert!(
            !saving.is_finished(),
            "the save ended before the server was stopped"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the upload never started"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // The object is visible a moment before its PUT's response reaches the client: let that
    // response land, so the pause catches the large file (seconds of upload), not this one.
    std::thread::sleep(Duration::from_millis(200));
    server.pause();
    let failed_at = Instant::now();
    let message = saving
        .wait()
        .expect_err("the save cannot succeed while the server is stopped")
        .to_string();
    eprintln!("error: {message}");
    assert!(
        message.contains(&format!("{checkpoints}/step-000000004")),
        "{message}"
    );
    assert!(message.contains("large.bin"), "{message}");
    assert!(
        failed_at.elapsed() < Duration::from_secs(30),
        "the failure took {:?}",
        failed_at.elapsed()
    );

    server.resume();
    assert!(exists(&*observer, &last_small), "step 4 was half written");
    assert!(!exists(
        &*observer,
        &format!("ckpt/step-000000004/{COMMIT_FILE}")
    ));
    assert_eq!(store.list_committed().unwrap(), [2]);
    assert_eq!(
        store.latest_valid().unwrap().unwrap().state.step,
        2,
        "the half checkpoint became latest"
    );

    let resumed = ditrun_train(&server.endpoint, &job, 4, "auto");
    assert_eq!(resumed["resumed_from"], 2);
    assert_eq!(resumed["steps_done"], 4);
    assert_eq!(store.list_committed().unwrap(), [2, 4]);
    let latest = store.latest_valid().unwrap().unwrap();
    assert_eq!(latest.state.step, 4);
    assert!(
        !latest.files.contains_key("large.bin"),
        "the trainer's own step 4 replaced the half one"
    );
}

#[test]
fn an_unreachable_store_fails_quickly_naming_the_url() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let url = "s3://nobody-home/ckpt";
    let store = CheckpointStore::from_store(
        s3_store(&closed, "nobody-home", Duration::from_secs(1), 1),
        Path::from("ckpt"),
        url,
        CheckpointOptions {
            keep_last: 0,
            retry: quick_retries(),
        },
    );

    let started = Instant::now();
    let files = vec![(MODEL_FILE.to_string(), Bytes::from_static(b"weights"))];
    let state = CheckpointState {
        step: 1,
        ..CheckpointState::default()
    };
    let message = store
        .save(state, files)
        .expect_err("nothing listens there")
        .to_string();
    eprintln!("error: {message}");
    assert!(
        message.contains("s3://nobody-home/ckpt/step-000000001"),
        "{message}"
    );
    assert!(message.contains("2 attempt"), "{message}");

    let message = store
        .latest_valid()
        .expect_err("nothing listens there")
        .to_string();
    eprintln!("error: {message}");
    assert!(message.contains(url), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// The user's path: `ditrun train` with the store from the `AWS_*` environment (the default
/// client retries, no test settings) pointed at a port nobody listens on.
#[test]
fn a_job_whose_store_is_unreachable_stops_with_the_url_and_the_cause() {
    let local = tempfile::tempdir().unwrap();
    let job = local.path().join("job.yaml");
    let yaml = tiny_job_yaml(
        "s3://nobody-home/shards",
        "s3://nobody-home/ckpt",
        local.path(),
        2,
    );
    std::fs::write(&job, yaml).unwrap();
    let closed = format!("http://127.0.0.1:{}", free_port());

    let started = Instant::now();
    let output = ditrun_command(&closed, &job, 2, "auto").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stderr}");
    assert!(!output.status.success());
    assert!(
        stderr.contains("s3://nobody-home/shards/index.json"),
        "{stderr}"
    );
    assert!(stderr.contains("Connection refused"), "{stderr}");
    // object_store's own retries (10, with jittered backoff from 100 ms) take a few seconds.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}
