//! Data-parallel training with real ranks: `mpirun -np 2` (OpenMPI) and `ditrun launch`
//! start the `ditrun` binary; the tests compare what the ranks report and what they wrote.
//!
//! The tests share the machine's cores, so they run one at a time.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod common;

use common::{mpi_env, mpirun, outcomes};
use ditrun::checkpoint::CheckpointStore;
use ditrun::train::MODEL_FILE;
use safetensors::SafeTensors;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn ditrun() -> &'static str {
    env!("CARGO_BIN_EXE_ditrun")
}

/// A 2-rank-sized tiny job: 8×8 images, one block, a 2-layer 32-wide text encoder, global
/// batch 8; `root` holds its shards, checkpoints and logs.
fn write_job(root: &Path, steps: u64, checkpoint_every: u64) -> PathBuf {
    let yaml = format!(
        r#"
name: tiny-dist
model: {{ image_size: 8, patch_size: 4, channels: 3, dim: 16, depth: 1, heads: 2, mlp_ratio: 2.0, context_dim: 32 }}
text_encoder: {{ hidden_size: 32, intermediate_size: 64, layers: 2, heads: 2 }}
data:
  shards: {root}/shards
  prepare: {{ dataset: synthetic, samples: 64, samples_per_shard: 16 }}
  shuffle_window: 2
  prefetch: 2
train: {{ steps: {steps}, batch_size: 8, lr: 1.0e-3, warmup_steps: 2, grad_clip: 1.0, ema_decay: 0.9, seed: 7, text_drop_prob: 0.2, backend: auto, threads: 1 }}
checkpoint: {{ url: {root}/checkpoints, every_steps: {checkpoint_every}, keep_last: 3 }}
logging: {{ dir: {root}/tensorboard, every_steps: 50 }}
dist: {{ timeout_secs: 60 }}
"#,
        root = root.display()
    );
    let path = root.join("job.yaml");
    std::fs::create_dir_all(root).unwrap();
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Waits for `child` at most `limit`, then kills it: a hung job fails the test, not CI.
fn finish(mut child: Child, limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        stdout.read_to_end(&mut buffer).ok();
        buffer
    });
    let err_reader = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        stderr.read_to_end(&mut buffer).ok();
        buffer
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            child.kill().ok();
            let status = child.wait().unwrap();
            let err = String::from_utf8_lossy(&err_reader.join().unwrap()).to_string();
            panic!("the job did not end within {limit:?} ({status}); stderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    let output = Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    };
    (output, elapsed)
}

fn run(mut command: Command) -> Output {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    finish(
        command.spawn().expect("the command starts"),
        Duration::from_secs(300),
    )
    .0
}

fn run_ok(command: Command) -> Output {
    let output = run(command);
    assert!(
        output.status.success(),
        "the job failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn train_args(job: &Path) -> Vec<String> {
    vec![
        ditrun().into(),
        "train".into(),
        "--job".into(),
        job.display().to_string(),
    ]
}

fn single_rank(job: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(ditrun());
    command
        .args(["train", "--job", &job.display().to_string()])
        .args(extra);
    command.env("RUST_LOG", "info");
    command
}

fn model_at(checkpoints: &Path, step: u64) -> Vec<u8> {
    let store = CheckpointStore::open(&checkpoints.display().to_string(), 3).unwrap();
    store.load(step).unwrap().files[MODEL_FILE].to_vec()
}

fn state_at(checkpoints: &Path, step: u64) -> ditrun::checkpoint::CheckpointState {
    let store = CheckpointStore::open(&checkpoints.display().to_string(), 3).unwrap();
    store.load(step).unwrap().state
}

/// ‖a − b‖ / ‖b‖ over all parameters of two safetensors files of the same model, leaving
/// out the attention key biases. Those get an exactly zero gradient in exact arithmetic
/// (adding a constant to every key of a query shifts its logits by a constant, which softmax
/// ignores), so their computed gradient is pure rounding noise, and AdamW, which divides by
/// the gradient's own scale, turns any change of summation order (two half batches instead of
/// one batch) into full-size random steps along them. PyTorch DDP shows the same.
fn relative_difference(a: &[u8], b: &[u8]) -> f64 {
    let (a, b) = (
        SafeTensors::deserialize(a).unwrap(),
        SafeTensors::deserialize(b).unwrap(),
    );
    let floats = |bytes: &[u8]| -> Vec<f64> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect()
    };
    let without_key_bias = |name: &str, values: Vec<f64>| -> Vec<f64> {
        if name.ends_with("cross.k.bias") {
            Vec::new()
        } else if name.ends_with("attn.qkv.bias") {
            // [q | k | v]: keep the query and value biases.
            let third = values.len() / 3;
            values[..third]
                .iter()
                .chain(&values[2 * third..])
                .copied()
                .collect()
        } else {
            values
        }
    };
    let mut names = a.names();
    names.sort();
    assert_eq!(names.len(), b.names().len());
    let (mut diff, mut norm) = (0.0, 0.0);
    for name in names {
        let x = without_key_bias(name, floats(a.tensor(name).unwrap().data()));
        let y = without_key_bias(name, floats(b.tensor(name).unwrap().data()));
        diff += x.iter().zip(&y).map(|(p, q)| (p - q).powi(2)).sum::<f64>();
        norm += y.iter().map(|q| q * q).sum::<f64>();
    }
    (diff / norm).sqrt()
}

#[test]
fn two_ranks_hold_bit_identical_parameters_after_training() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), 6, 3);
    let mut command = mpirun(2);
    command.args(train_args(&job));
    let output = run_ok(command);
    let reports = outcomes(&output);
    assert_eq!(
        reports.len(),
        2,
        "one outcome per rank:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    for (rank, report) in reports.iter().enumerate() {
        assert_eq!(report["rank"], rank);
        assert_eq!(report["world_size"], 2);
        assert_eq!(report["steps_done"], 6);
        assert_eq!(report["micro_batch_size"], 4);
    }
    assert_eq!(reports[0]["params_sha256"], reports[1]["params_sha256"]);
    // Rank 0 alone writes checkpoints, and records the world they came from.
    assert_eq!(state_at(&dir.path().join("checkpoints"), 6).world_size, 2);
    assert!(reports[1]["last_checkpoint"].is_null());
}

#[test]
fn two_ranks_with_micro_batch_b_reach_the_weights_of_one_rank_with_batch_2b() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let two_ranks = dir.path().join("two-ranks");
    let mut command = mpirun(2);
    command.args(train_args(&write_job(&two_ranks, 6, 6)));
    run_ok(command);

    let one_rank = dir.path().join("one-rank");
    run_ok(single_rank(&write_job(&one_rank, 6, 6), &[]));
    let accumulating = dir.path().join("one-rank-accumulating");
    let output = run_ok(single_rank(
        &write_job(&accumulating, 6, 6),
        &["--set", "train.micro_batch_size=4"],
    ));
    assert_eq!(outcomes(&output)[0]["accumulation_steps"], 2);

    let reference = model_at(&two_ranks.join("checkpoints"), 6);
    let batch_2b = relative_difference(&model_at(&one_rank.join("checkpoints"), 6), &reference);
    let accumulated =
        relative_difference(&model_at(&accumulating.join("checkpoints"), 6), &reference);
    assert!(
        batch_2b < 1e-5,
        "one rank, batch 2B: relative difference {batch_2b:e}"
    );
    assert!(
        accumulated < 1e-5,
        "one rank, micro-batch B × 2 passes: relative difference {accumulated:e}"
    );
    // The comparison is not vacuous: training moved the weights.
    let initial = dir.path().join("initial");
    run_ok(single_rank(
        &write_job(&initial, 6, 1),
        &["--stop-after", "1"],
    ));
    assert!(relative_difference(&model_at(&initial.join("checkpoints"), 1), &reference) > 1e-3);
}

#[test]
fn a_two_rank_checkpoint_resumes_on_one_rank_and_continues_the_same_samples() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let uninterrupted = dir.path().join("uninterrupted");
    let mut command = mpirun(2);
    command.args(train_args(&write_job(&uninterrupted, 6, 2)));
    run_ok(command);

    let moved = dir.path().join("moved");
    let job = write_job(&moved, 6, 2);
    let mut command = mpirun(2);
    command.args(train_args(&job)).args(["--stop-after", "4"]);
    run_ok(command);
    let output = run_ok(single_rank(&job, &["--set", "train.micro_batch_size=4"]));
    let report = &outcomes(&output)[0];
    assert_eq!(report["resumed_from"], 4);
    assert_eq!(
        (
            report["world_size"].as_u64(),
            report["accumulation_steps"].as_u64()
        ),
        (Some(1), Some(2))
    );

    let (a, b) = (
        state_at(&moved.join("checkpoints"), 6),
        state_at(&uninterrupted.join("checkpoints"), 6),
    );
    assert_eq!(
        (a.epoch, a.position),
        (b.epoch, b.position),
        "the data stream continued at the same place"
    );
    let difference = relative_difference(
        &model_at(&moved.join("checkpoints"), 6),
        &model_at(&uninterrupted.join("checkpoints"), 6),
    );
    assert!(
        difference < 1e-5,
        "resumed on one rank: relative difference {difference:e}"
    );
}

/// The pid of `rank` of the job marked with `marker` (an environment variable the test set).
fn rank_pid(marker: &str, rank: usize, restart: Option<u32>) -> Option<u32> {
    let wanted_rank = format!("OMPI_COMM_WORLD_RANK={rank}");
    let wanted_marker = format!("DITRUN_TEST_MARKER={marker}");
    let wanted_restart = restart.map(|r| format!("DITRUN_LAUNCH_RESTART={r}"));
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let vars: Vec<String> = environ
            .split(|&b| b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        let has = |wanted: &str| vars.iter().any(|v| v == wanted);
        if has(&wanted_rank) && has(&wanted_marker) && wanted_restart.as_deref().is_none_or(has) {
            return Some(pid);
        }
    }
    None
}

/// Waits until the job has committed a checkpoint after `after_step` (so killing it now
/// leaves something to resume from), then returns that step.
fn wait_for_checkpoint(checkpoints: &Path, after_step: u64) -> u64 {
    let started = Instant::now();
    loop {
        if let Ok(entries) = std::fs::read_dir(checkpoints) {
            let newest = entries
                .flatten()
                .filter(|e| e.path().join("COMMIT").exists())
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_prefix("step-")?
                        .parse::<u64>()
                        .ok()
                })
                .max();
            if let Some(step) = newest.filter(|&s| s > after_step) {
                return step;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint after step {after_step} within 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kill(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

#[test]
fn a_rank_killed_mid_run_ends_the_job_within_30_s_naming_it() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), 1_000_000, 5);
    let marker = format!("killed-{}", std::process::id());
    let mut command = mpirun(2);
    command
        .args(train_args(&job))
        .env("DITRUN_TEST_MARKER", &marker);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = command.spawn().unwrap();
    wait_for_checkpoint(&dir.path().join("checkpoints"), 0);
    let pid = rank_pid(&marker, 1, None).expect("rank 1 is running");
    kill(pid, "-9");
    let (output, elapsed) = finish(child, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        elapsed < Duration::from_secs(30),
        "the job took {elapsed:?} to end"
    );
    assert!(
        stderr.contains("rank 1"),
        "the failing rank is named:\n{stderr}"
    );
}

#[test]
fn a_rank_that_stops_answering_times_out_the_collective_naming_it() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), 1_000_000, 5);
    let marker = format!("stopped-{}", std::process::id());
    let mut command = mpirun(2);
    command
        .args(train_args(&job))
        .args(["--set", "dist.timeout_secs=3"])
        .env("DITRUN_TEST_MARKER", &marker);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = command.spawn().unwrap();
    wait_for_checkpoint(&dir.path().join("checkpoints"), 0);
    // A stopped process is alive to mpirun: only the collective's deadline notices it.
    let pid = rank_pid(&marker, 1, None).expect("rank 1 is running");
    kill(pid, "-STOP");
    let (output, elapsed) = finish(child, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        elapsed < Duration::from_secs(30),
        "the job took {elapsed:?} to end"
    );
    // Stopped between collectives, rank 1 never arrives; stopped inside one, its transfer
    // stalls. Either way rank 0 names it.
    assert!(
        stderr.contains("rank(s) 1 did not arrive")
            || stderr.contains("transfer with rank(s) 1 stalled"),
        "the missing rank is named:\n{stderr}"
    );
    // The flight recorder: rank 0's last collectives, the one it waits in still in flight,
    // with sequence numbers the stuck rank's own record would be behind.
    assert!(
        stderr.contains("rank 0: last collectives (timed out), oldest first:"),
        "rank 0 dumps its flight record:\n{stderr}"
    );
    let in_flight = stderr
        .lines()
        .filter(|line| line.trim_start().starts_with("rank 0 #") && line.contains("IN FLIGHT"))
        .count();
    assert_eq!(in_flight, 1, "one collective in flight:\n{stderr}");
}

#[test]
fn launch_restarts_the_job_from_its_latest_checkpoint_after_a_rank_dies() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), 400, 20);
    let marker = format!("restarted-{}", std::process::id());
    let mut command = Command::new(ditrun());
    mpi_env(&mut command);
    command
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "1",
            "--mpirun-arg=--oversubscribe",
            "--",
        ])
        .args(&train_args(&job)[1..])
        .env("DITRUN_TEST_MARKER", &marker)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn().unwrap();
    let committed = wait_for_checkpoint(&dir.path().join("checkpoints"), 0);
    kill(
        rank_pid(&marker, 1, Some(0)).expect("rank 1 of the first attempt is running"),
        "-9",
    );
    let (output, _) = finish(child, Duration::from_secs(240));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the restarted job finished:\n{stderr}"
    );
    assert!(stderr.contains("rank 1 was killed by signal 9"), "{stderr}");
    assert!(stderr.contains("restart 1 of 1"), "{stderr}");
    let reports = outcomes(&output);
    assert_eq!(reports.len(), 2, "only the restarted attempt finished");
    assert_eq!(reports[0]["steps_done"], 400);
    let resumed = reports[0]["resumed_from"]
        .as_u64()
        .expect("the restart resumed from a checkpoint");
    assert!(
        resumed >= committed && resumed < 400,
        "resumed from step {resumed}"
    );
}

#[test]
fn launch_gives_up_with_the_failing_rank_s_exit_code() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), 1_000_000, 5);
    let marker = format!("given-up-{}", std::process::id());
    let mut command = Command::new(ditrun());
    mpi_env(&mut command);
    command
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--mpirun-arg=--oversubscribe",
            "--",
        ])
        .args(&train_args(&job)[1..])
        .env("DITRUN_TEST_MARKER", &marker)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn().unwrap();
    wait_for_checkpoint(&dir.path().join("checkpoints"), 0);
    kill(
        rank_pid(&marker, 1, Some(0)).expect("rank 1 is running"),
        "-9",
    );
    let (output, _) = finish(child, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(137), "128 + SIGKILL:\n{stderr}");
    assert!(stderr.contains("giving up after 0 restart(s)"), "{stderr}");
}

#[test]
fn ranks_with_different_configs_are_refused_at_start() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), 6, 3);
    // mpirun's MPMD form: rank 0 and rank 1 run different command lines.
    let mut command = Command::new("mpirun");
    mpi_env(&mut command);
    command
        .args(["--oversubscribe", "-np", "1"])
        .args(train_args(&job))
        .args([":", "-np", "1"])
        .args(train_args(&job))
        .args(["--set", "train.lr=0.002"]);
    let output = run(command);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("the ranks disagree on the effective config"),
        "{stderr}"
    );
    assert!(
        stderr.contains("rank 1 has"),
        "the differing rank is named:\n{stderr}"
    );
    assert!(
        !dir.path().join("checkpoints").exists(),
        "nothing was trained"
    );
}
