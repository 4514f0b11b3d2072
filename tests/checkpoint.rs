//! Checkpoints on real stores (a temp directory through `file://`, the process-wide
//! `memory://`, and a throttled in-memory store): round trips, retention, commit markers,
//! damage detection with fallback, background uploads, retries and a store that stays down.

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ditrun::checkpoint::{
    load_url, step_dir_name, BestCheckpoint, BestMetric, CheckpointOptions, CheckpointState,
    CheckpointStore, FileRecord, RetryPolicy, BEST_FILE, COMMIT_FILE, STATE_FILE,
};
use ditrun::error::Error;
use ditrun::storage::block_on;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::throttle::{ThrottleConfig, ThrottledStore};
use object_store::ObjectStoreExt;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn quick_retries(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts,
        base_delay: Duration::from_millis(2),
        max_delay: Duration::from_millis(20),
    }
}

fn options(keep_last: usize) -> CheckpointOptions {
    CheckpointOptions {
        keep_last,
        retry: quick_retries(3),
    }
}

fn state(step: u64) -> CheckpointState {
    CheckpointState {
        step,
        epoch: step / 3,
        position: step * 64,
        rng: vec![step ^ 0x9e37_79b9_7f4a_7c15, 42, u64::MAX],
        config_hash: format!("cfg-{step}"),
        world_size: 2,
        files: BTreeMap::new(),
        created_unix: 1_700_000_000 + step,
        extra: serde_json::json!({ "lr": 1e-4, "note": format!("step {step}") }),
    }
}

/// Distinct, step-dependent contents so a mix-up between steps would show.
fn files(step: u64) -> Vec<(String, Bytes)> {
    let blob = |name: &str, len: usize| {
        let bytes: Vec<u8> = (0..len)
            .map(|i| {
                (i as u64)
                    .wrapping_mul(31)
                    .wrapping_add(step * 7 + name.len() as u64) as u8
            })
            .collect();
        (name.to_string(), Bytes::from(bytes))
    };
    vec![
        blob("model.safetensors", 4096),
        blob("ema.safetensors", 4096),
        blob("optimizer.bin", 8192),
    ]
}

fn file_map(step: u64) -> BTreeMap<String, Bytes> {
    files(step).into_iter().collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn temp_store(keep_last: usize) -> (TempDir, PathBuf, CheckpointStore) {
    let dir = TempDir::new().unwrap();
    let root = dir.path().join("ckpt");
    let store = CheckpointStore::open_with(&file_url(&root), options(keep_last)).unwrap();
    (dir, root, store)
}

fn file_url(path: &FsPath) -> String {
    url::Url::from_file_path(path).unwrap().to_string()
}

fn step_dir(root: &FsPath, step: u64) -> PathBuf {
    root.join(step_dir_name(step))
}

fn save_steps(store: &CheckpointStore, steps: &[u64]) {
    for &step in steps {
        store.save(state(step), files(step)).unwrap();
    }
}

/// The error's text, printed so `--nocapture` shows what users would read.
fn message(result: Result<impl std::fmt::Debug, Error>) -> String {
    let text = result.expect_err("expected an error").to_string();
    eprintln!("error: {text}");
    text
}

// ---------------------------------------------------------------------------------------------
// Round trips and layout
// ---------------------------------------------------------------------------------------------

#[test]
fn save_then_load_round_trips_bytes_and_state_on_file_store() {
    let (_dir, root, store) = temp_store(0);
    let handle = store.save_async(state(1000), files(1000)).unwrap();
    assert_eq!(handle.step(), 1000);
    assert!(handle.checkpoint_url().ends_with("/ckpt/step-000001000"));
    handle.wait().unwrap();

    let folder = step_dir(&root, 1000);
    for name in [
        "model.safetensors",
        "ema.safetensors",
        "optimizer.bin",
        STATE_FILE,
        COMMIT_FILE,
    ] {
        assert!(folder.join(name).is_file(), "{name} missing in {folder:?}");
    }
    assert_eq!(store.list_committed().unwrap(), [1000]);

    let loaded = store.load(1000).unwrap();
    let expected_files = file_map(1000);
    assert_eq!(loaded.files, expected_files);
    let mut expected_state = state(1000);
    expected_state.files = expected_files
        .iter()
        .map(|(name, bytes)| {
            let record = FileRecord {
                sha256: sha256_hex(bytes),
                bytes: bytes.len() as u64,
            };
            (name.clone(), record)
        })
        .collect();
    assert_eq!(loaded.state, expected_state);
    assert_eq!(loaded.url, store.step_url(1000));

    // state.json on disk is the same record, and COMMIT vouches for it.
    let state_json = std::fs::read(folder.join(STATE_FILE)).unwrap();
    let on_disk: CheckpointState = serde_json::from_slice(&state_json).unwrap();
    assert_eq!(on_disk, expected_state);
    let commit = std::fs::read_to_string(folder.join(COMMIT_FILE)).unwrap();
    assert_eq!(commit.trim(), sha256_hex(&state_json));
}

#[test]
fn save_fills_in_the_creation_time_when_not_given() {
    let (_dir, _root, store) = temp_store(0);
    let mut unstamped = state(3);
    unstamped.created_unix = 0;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    store.save(unstamped, files(3)).unwrap();
    let created = store.load(3).unwrap().state.created_unix;
    assert!(
        created >= before && created <= before + 60,
        "{created} vs {before}"
    );
}

#[test]
fn memory_store_round_trip_and_latest() {
    let url = "memory://checkpoint-tests/round-trip";
    let store = CheckpointStore::open_with(url, options(0)).unwrap();
    assert!(store.latest_valid().unwrap().is_none());
    save_steps(&store, &[10, 20]);
    assert_eq!(store.list_committed().unwrap(), [10, 20]);

    let latest = store.latest_valid().unwrap().unwrap();
    assert_eq!(latest.state.step, 20);
    assert_eq!(latest.files, file_map(20));
    assert_eq!(
        latest.url,
        "memory://checkpoint-tests/round-trip/step-000000020"
    );

    // Another handle on the same URL sees the same checkpoints.
    let again = CheckpointStore::open(url, 0).unwrap();
    assert_eq!(again.load(10).unwrap().state, store.load(10).unwrap().state);
}

#[test]
fn load_url_accepts_a_step_folder_its_parent_and_a_local_path() {
    let (_dir, root, store) = temp_store(0);
    save_steps(&store, &[1, 2]);

    let explicit = load_url(&store.step_url(1)).unwrap();
    assert_eq!(explicit.state.step, 1);
    assert_eq!(explicit.files, file_map(1));

    assert_eq!(load_url(store.url()).unwrap().state.step, 2);
    assert_eq!(
        load_url(&format!("{}/", store.url())).unwrap().state.step,
        2
    );
    assert_eq!(load_url(root.to_str().unwrap()).unwrap().state.step, 2);
    let local_step = step_dir(&root, 1);
    assert_eq!(
        load_url(local_step.to_str().unwrap()).unwrap().state.step,
        1
    );

    let memory =
        CheckpointStore::open_with("memory://checkpoint-tests/load-url", options(0)).unwrap();
    save_steps(&memory, &[5]);
    assert_eq!(
        load_url("memory://checkpoint-tests/load-url")
            .unwrap()
            .state
            .step,
        5
    );
    let step_url = "memory://checkpoint-tests/load-url/step-000000005";
    assert_eq!(load_url(step_url).unwrap().state.step, 5);
}

#[test]
fn load_url_of_an_empty_folder_says_nothing_is_committed() {
    let dir = TempDir::new().unwrap();
    let url = file_url(&dir.path().join("nothing-here"));
    let text = message(load_url(&url));
    assert!(text.contains(&url), "{text}");
    assert!(text.contains("no committed checkpoint"), "{text}");

    let missing_step = format!("{url}/step-000000007");
    let text = message(load_url(&missing_step));
    assert!(text.contains(&missing_step), "{text}");
    assert!(text.contains("not committed"), "{text}");
}

#[test]
fn unsupported_scheme_is_rejected_with_the_url() {
    let text = message(CheckpointStore::open("ftp://host/ckpt", 2));
    assert!(text.contains("ftp://host/ckpt"), "{text}");
}

#[test]
fn bad_file_names_are_rejected_before_anything_is_written() {
    let (_dir, root, store) = temp_store(0);
    for bad in [
        "../escape.bin",
        "sub/model.safetensors",
        STATE_FILE,
        COMMIT_FILE,
    ] {
        let mut given = files(4);
        given.push((bad.to_string(), Bytes::from_static(b"x")));
        let text = message(store.save_async(state(4), given));
        assert!(text.contains(&format!("`{bad}`")), "{text}");
        assert!(text.contains("step-000000004"), "{text}");
    }
    assert!(!step_dir(&root, 4).exists());
    assert!(store.list_committed().unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Retention and commit markers
// ---------------------------------------------------------------------------------------------

#[test]
fn keep_last_deletes_the_oldest_committed_steps() {
    let (_dir, root, store) = temp_store(2);
    save_steps(&store, &[100, 200, 300, 400]);
    assert_eq!(store.list_committed().unwrap(), [300, 400]);
    for gone in [100, 200] {
        assert!(!step_dir(&root, gone).exists(), "step {gone} still on disk");
    }
    assert_eq!(store.load(300).unwrap().files, file_map(300));
}

#[test]
fn keep_last_never_deletes_the_step_just_written() {
    let (_dir, _root, store) = temp_store(1);
    save_steps(&store, &[50, 60]);
    // A run resumed from an older point writes a lower step than what is there.
    save_steps(&store, &[55]);
    assert_eq!(store.list_committed().unwrap(), [55]);
    assert_eq!(store.latest_valid().unwrap().unwrap().state.step, 55);
}

#[test]
fn step_folder_without_commit_is_ignored() {
    let (_dir, root, store) = temp_store(0);
    save_steps(&store, &[1, 2]);
    std::fs::remove_file(step_dir(&root, 2).join(COMMIT_FILE)).unwrap();
    // An interrupted save: files and state, no COMMIT.
    std::fs::create_dir_all(step_dir(&root, 3)).unwrap();
    std::fs::write(step_dir(&root, 3).join("model.safetensors"), b"partial").unwrap();

    assert_eq!(store.list_committed().unwrap(), [1]);
    assert_eq!(store.latest_valid().unwrap().unwrap().state.step, 1);
    let text = message(store.load(2));
    assert!(text.contains(&store.step_url(2)), "{text}");
    assert!(text.contains("not committed"), "{text}");
}

#[test]
fn stale_uncommitted_folders_are_removed_after_a_newer_commit() {
    let (_dir, root, store) = temp_store(0);
    save_steps(&store, &[1]);
    std::fs::create_dir_all(step_dir(&root, 2)).unwrap();
    std::fs::write(step_dir(&root, 2).join("model.safetensors"), b"partial").unwrap();
    std::fs::create_dir_all(step_dir(&root, 9)).unwrap();
    std::fs::write(
        step_dir(&root, 9).join("model.safetensors"),
        b"maybe in progress",
    )
    .unwrap();

    save_steps(&store, &[3]);
    assert!(
        !step_dir(&root, 2).exists(),
        "stale uncommitted step 2 kept"
    );
    assert!(
        step_dir(&root, 9).exists(),
        "newer uncommitted step 9 deleted"
    );
    assert_eq!(store.list_committed().unwrap(), [1, 3]);
}

#[test]
fn resaving_a_committed_step_replaces_it() {
    let (_dir, _root, store) = temp_store(0);
    save_steps(&store, &[7]);
    let mut other = files(8);
    other.truncate(1);
    store.save(state(7), other.clone()).unwrap();
    let loaded = store.load(7).unwrap();
    assert_eq!(loaded.files, other.into_iter().collect::<BTreeMap<_, _>>());
    assert_eq!(loaded.state.files.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Damage: wrong checksum, missing file, damaged record
// ---------------------------------------------------------------------------------------------

#[test]
fn wrong_checksum_is_named_and_latest_falls_back() {
    let (_dir, root, store) = temp_store(0);
    save_steps(&store, &[1, 2]);
    let damaged = step_dir(&root, 2).join("ema.safetensors");
    let mut bytes = std::fs::read(&damaged).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&damaged, &bytes).unwrap();

    let text = message(store.load(2));
    assert!(text.contains(&store.step_url(2)), "{text}");
    assert!(text.contains("`ema.safetensors`"), "{text}");
    let expected = sha256_hex(&files(2)[1].1);
    assert!(text.contains(&expected), "expected sha missing: {text}");
    assert!(
        text.contains(&sha256_hex(&bytes)),
        "found sha missing: {text}"
    );

    assert_eq!(store.list_committed().unwrap(), [1, 2]);
    let latest = store.latest_valid().unwrap().unwrap();
    assert_eq!(latest.state.step, 1);
    assert_eq!(latest.files, file_map(1));
    assert_eq!(load_url(store.url()).unwrap().state.step, 1);
}

#[test]
fn missing_file_is_named_and_latest_falls_back_on_memory_store() {
    let url = "memory://checkpoint-tests/missing-file";
    let store = CheckpointStore::open_with(url, options(0)).unwrap();
    save_steps(&store, &[1, 2]);
    let (memory, root) = ditrun::storage::object_store_for(url).unwrap();
    let model = root
        .join(step_dir_name(2).as_str())
        .join("model.safetensors");
    block_on(memory.delete(&model)).unwrap();

    let text = message(store.load(2));
    assert!(
        text.contains("memory://checkpoint-tests/missing-file/step-000000002"),
        "{text}"
    );
    assert!(text.contains("`model.safetensors`"), "{text}");
    assert!(text.contains("missing"), "{text}");
    assert_eq!(store.latest_valid().unwrap().unwrap().state.step, 1);
}

#[test]
fn truncated_file_reports_sizes() {
    let (_dir, root, store) = temp_store(0);
    save_steps(&store, &[1]);
    let file = step_dir(&root, 1).join("optimizer.bin");
    std::fs::write(&file, &std::fs::read(&file).unwrap()[..1000]).unwrap();
    let text = message(store.load(1));
    assert!(text.contains("`optimizer.bin`"), "{text}");
    assert!(
        text.contains("1000 bytes") && text.contains("8192"),
        "{text}"
    );
}

#[test]
fn damaged_state_json_is_caught_by_the_commit_marker() {
    let (_dir, root, store) = temp_store(0);
    save_steps(&store, &[1, 2]);
    let record = step_dir(&root, 2).join(STATE_FILE);
    let edited = std::fs::read_to_string(&record)
        .unwrap()
        .replace("\"epoch\": 0", "\"epoch\": 9");
    std::fs::write(&record, edited).unwrap();

    let text = message(store.load(2));
    assert!(text.contains(&store.step_url(2)), "{text}");
    assert!(text.contains(&format!("`{STATE_FILE}`")), "{text}");
    assert!(text.contains(COMMIT_FILE), "{text}");
    assert_eq!(store.latest_valid().unwrap().unwrap().state.step, 1);
}

#[test]
fn every_committed_step_damaged_is_an_error_not_a_fresh_start() {
    let (_dir, root, store) = temp_store(0);
    save_steps(&store, &[1]);
    std::fs::remove_file(step_dir(&root, 1).join("model.safetensors")).unwrap();
    let text = message(store.latest_valid());
    assert!(text.contains(store.url()), "{text}");
    assert!(text.contains("`model.safetensors`"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Background uploads
// ---------------------------------------------------------------------------------------------

const PUT_DELAY: Duration = Duration::from_millis(120);

fn slow_memory_store(keep_last: usize) -> (Arc<InMemory>, CheckpointStore) {
    let memory = Arc::new(InMemory::new());
    let throttled = ThrottledStore::new(
        memory.clone(),
        ThrottleConfig {
            wait_put_per_call: PUT_DELAY,
            ..ThrottleConfig::default()
        },
    );
    let store = CheckpointStore::from_store(
        Arc::new(throttled),
        Path::from("runs/slow"),
        "memory://slow-test/runs/slow",
        options(keep_last),
    );
    (memory, store)
}

fn exists(store: &InMemory, location: &Path) -> bool {
    block_on(store.head(location)).is_ok()
}

#[test]
fn save_async_returns_before_the_upload_and_commit_comes_last() {
    let (memory, store) = slow_memory_store(0);
    let folder = Path::from("runs/slow").join(step_dir_name(1).as_str());
    let watched: Vec<String> = files(1)
        .iter()
        .map(|(name, _)| name.clone())
        .chain([STATE_FILE.to_string(), COMMIT_FILE.to_string()])
        .collect();

    let started = Instant::now();
    let handle = store.save_async(state(1), files(1)).unwrap();
    let handed_over = started.elapsed();
    assert!(
        handed_over < PUT_DELAY,
        "save_async blocked for {handed_over:?}"
    );
    assert!(!handle.is_finished());
    assert!(!exists(&memory, &folder.clone().join(COMMIT_FILE)));

    // Watch the objects appear; COMMIT must be the last one and state.json the one before.
    let mut appeared: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while appeared.len() < watched.len() && Instant::now() < deadline {
        for name in &watched {
            if !appeared.contains(name) && exists(&memory, &folder.clone().join(name.as_str())) {
                appeared.push(name.clone());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(appeared.len(), watched.len(), "only {appeared:?} appeared");
    assert_eq!(appeared[appeared.len() - 2..], [STATE_FILE, COMMIT_FILE]);
    handle.wait().unwrap();
    assert!(
        started.elapsed() >= PUT_DELAY * 5,
        "five throttled puts were not all made"
    );
    assert_eq!(store.load(1).unwrap().files, file_map(1));
}

#[test]
fn a_second_save_waits_for_the_first_to_finish() {
    let (_memory, store) = slow_memory_store(0);
    let first = store.save_async(state(1), files(1)).unwrap();
    let second = store.save_async(state(2), files(2)).unwrap();
    assert!(
        first.is_finished(),
        "the second save started while the first was in flight"
    );
    first.wait().unwrap();
    store.wait_all().unwrap();
    assert!(second.is_finished());
    second.wait().unwrap();
    assert_eq!(store.list_committed().unwrap(), [1, 2]);
}

// ---------------------------------------------------------------------------------------------
// Failing stores
// ---------------------------------------------------------------------------------------------

/// Makes every write into step `step`'s folder fail on the local file system (a regular file
/// sits where the folder should be), as long as the file is there.
fn block_step_folder(root: &FsPath, step: u64) -> PathBuf {
    let blocker = step_dir(root, step);
    std::fs::create_dir_all(root).unwrap();
    std::fs::write(&blocker, b"not a directory").unwrap();
    blocker
}

#[test]
fn transient_failures_are_retried_until_the_store_recovers() {
    let dir = TempDir::new().unwrap();
    let root = dir.path().join("ckpt");
    let patient = CheckpointOptions {
        keep_last: 0,
        retry: RetryPolicy {
            attempts: 100,
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
        },
    };
    let store = CheckpointStore::open_with(&file_url(&root), patient).unwrap();
    let blocker = block_step_folder(&root, 1);

    let handle = store.save_async(state(1), files(1)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(4);
    while store.transient_failures() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(store.transient_failures() >= 3, "the store never failed");
    assert!(
        !handle.is_finished(),
        "the save gave up while the store was down"
    );
    std::fs::remove_file(&blocker).unwrap();

    handle.wait().unwrap();
    assert!(step_dir(&root, 1).join(COMMIT_FILE).is_file());
    assert_eq!(store.load(1).unwrap().files, file_map(1));
}

#[test]
fn a_store_that_stays_down_is_a_clear_error_and_the_previous_stays_latest() {
    let (_dir, root, store) = temp_store(0);
    save_steps(&store, &[1]);
    block_step_folder(&root, 2);

    let text = message(store.save_async(state(2), files(2)).unwrap().wait());
    assert!(text.contains(&store.step_url(2)), "{text}");
    assert!(text.contains(&file_url(&root)), "{text}");
    assert!(text.contains("after 3 attempt"), "{text}");
    assert!(!step_dir(&root, 2).join(COMMIT_FILE).exists());

    assert_eq!(store.list_committed().unwrap(), [1]);
    assert_eq!(store.latest_valid().unwrap().unwrap().state.step, 1);
    // Already reported through the handle: the store does not report it twice.
    store.wait_all().unwrap();
}

#[test]
fn a_background_failure_is_returned_by_the_next_save_async_and_wait_all() {
    let (_dir, root, store) = temp_store(0);
    let blocker = block_step_folder(&root, 1);

    // Nobody waits on this handle; the failure must still reach the caller.
    let unwatched = store.save_async(state(1), files(1)).unwrap();
    let text = message(store.save_async(state(2), files(2)));
    assert!(text.contains(&store.step_url(1)), "{text}");
    assert!(unwatched.is_finished());
    // The save's own handle still says it failed.
    let restated = message(unwatched.wait());
    assert!(restated.contains(&store.step_url(1)), "{restated}");
    // The second save was not started: nothing of step 2 exists.
    assert!(!step_dir(&root, 2).exists());

    std::fs::remove_file(&blocker).unwrap();
    let _ = store.save_async(state(1), files(1)).unwrap();
    block_step_folder(&root, 3);
    let _ = store.save_async(state(3), files(3)).unwrap();
    let text = message(store.wait_all());
    assert!(text.contains(&store.step_url(3)), "{text}");
    store.wait_all().unwrap();
    assert_eq!(store.list_committed().unwrap(), [1]);
}

// ---------------------------------------------------------------------------------------------
// The best checkpoint (checkpoint.keep_best)
// ---------------------------------------------------------------------------------------------

fn best_at(store: &CheckpointStore, step: u64, value: f64) -> BestCheckpoint {
    BestCheckpoint {
        step,
        metric: BestMetric::Fid,
        value,
        cfg: 4.0,
        checkpoint: store.step_url(step),
    }
}

#[test]
fn the_best_survives_retention_and_best_json_names_it_once_committed() {
    let (_dir, root, store) = temp_store(2);
    save_steps(&store, &[10]);
    // The trainer marks a step best before its save; best.json follows that step's COMMIT.
    store.set_best(Some(best_at(&store, 20, 12.5)));
    assert!(
        !root.join(BEST_FILE).exists(),
        "nothing is named before the save"
    );
    save_steps(&store, &[20, 30, 40, 50]);

    let mut kept: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    let expected = [
        BEST_FILE,
        "step-000000020",
        "step-000000040",
        "step-000000050",
    ];
    assert_eq!(kept, expected, "the last 2 and the best apart");

    let record: BestCheckpoint =
        serde_json::from_slice(&std::fs::read(root.join(BEST_FILE)).unwrap()).unwrap();
    assert_eq!(record, best_at(&store, 20, 12.5));
    let best = load_url(&format!("{}/best", store.url())).unwrap();
    assert_eq!(best.state.step, 20);
    assert_eq!(best.files, file_map(20));

    // A new store on the folder (a resumed run) finds the record; forgetting it deletes it.
    let reopened = CheckpointStore::open_with(&file_url(&root), options(2)).unwrap();
    assert_eq!(reopened.best().unwrap(), Some(record));
    reopened.forget_best().unwrap();
    assert!(!root.join(BEST_FILE).exists());
    assert!(reopened.best().unwrap().is_none());
    let text = message(load_url(&format!("{}/best", store.url())));
    assert!(text.contains("checkpoint.keep_best"), "{text}");
}
