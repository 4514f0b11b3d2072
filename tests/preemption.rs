//! Faults with real processes and real signals: SIGTERM to `ditrun train`, to one rank of a
//! 2-rank `mpirun` job, and to `ditrun launch`, ends the job after an agreed step with a
//! committed checkpoint of it and exit code 143, and `--resume auto` then ends bit-identical to
//! an uninterrupted run; SIGKILL leaves the last committed checkpoint as the latest; a rank
//! throttled with SIGSTOP/SIGCONT is named as the slowest in rank 0's log.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{mpirun, outcomes};
use ditrun::checkpoint::CheckpointStore;

const STEPS: u64 = 600;

/// The tests time their processes: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn ditrun() -> &'static str {
    env!("CARGO_BIN_EXE_ditrun")
}

/// A job whose steps take a few milliseconds: a signal lands mid-run. Checkpoints only at the
/// end, so the one a stop leaves is the stop's own.
fn write_job(root: &Path, threads: usize) -> PathBuf {
    write_job_saving_every(root, threads, 0)
}

fn write_job_saving_every(root: &Path, threads: usize, every_steps: u64) -> PathBuf {
    let yaml = format!(
        r#"
name: tiny-preemption
model: {{ image_size: 8, patch_size: 4, channels: 3, dim: 16, depth: 1, heads: 2, mlp_ratio: 2.0, context_dim: 32 }}
text_encoder: {{ hidden_size: 32, intermediate_size: 64, layers: 2, heads: 2 }}
data:
  shards: {root}/shards
  prepare: {{ dataset: synthetic, samples: 64, samples_per_shard: 16 }}
  shuffle_window: 2
  prefetch: 2
train: {{ steps: {STEPS}, batch_size: 8, lr: 1.0e-3, warmup_steps: 2, ema_decay: 0.9, seed: 7, backend: auto, threads: {threads} }}
checkpoint: {{ url: {root}/checkpoints, every_steps: {every_steps}, keep_last: 2 }}
logging: {{ dir: "", every_steps: 1 }}
sample: {{ every_steps: 0, at_end: false }}
dist: {{ timeout_secs: 60 }}
"#,
        root = root.display()
    );
    let path = root.join("job.yaml");
    std::fs::create_dir_all(root).unwrap();
    std::fs::write(&path, yaml).unwrap();
    path
}

fn train_command(job: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(ditrun());
    command
        .args(["train", "--job", &job.display().to_string()])
        .args(extra);
    command.env("RUST_LOG", "info");
    command
}

fn run_to_end(mut command: Command) -> Vec<serde_json::Value> {
    let output = command.output().expect("the command starts");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    outcomes(&output)
}

/// Starts `command`, waits until its log shows step `step` done, then runs `signal_it`; returns
/// the finished process's output (stderr as read so far and after).
fn signal_after_step(
    mut command: Command,
    step: u64,
    signal_it: impl FnOnce(&Child),
) -> (Output, Duration) {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("the command starts");
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            let _ = lines_tx.send(line);
        }
        all
    });
    let marker = format!("step {step}/{STEPS}:");
    let started = Instant::now();
    loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("no `{marker}` line within 120 s"));
        if line.contains(&marker) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the job did not reach step {step}"
        );
    }
    let signalled = Instant::now();
    signal_it(&child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("the job did not stop within 60 s of the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stopped_in = signalled.elapsed();
    let mut stdout = Vec::new();
    std::io::Read::read_to_end(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    let stderr = reader.join().unwrap().into_bytes();
    (
        Output {
            status,
            stdout,
            stderr,
        },
        stopped_in,
    )
}

fn sigterm(pid: u32) {
    // SAFETY: sends a signal to a process this test started (or one of its ranks).
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
}

fn latest_step(root: &Path) -> Option<u64> {
    let store = CheckpointStore::open(&format!("{}/checkpoints", root.display()), 2).unwrap();
    store
        .latest_valid()
        .unwrap()
        .map(|checkpoint| checkpoint.state.step)
}

#[test]
fn sigterm_stops_a_run_with_a_checkpoint_of_its_last_step_and_resume_ends_bit_identical() {
    let _one = serial();
    let straight = tempfile::tempdir().unwrap();
    let uninterrupted = run_to_end(train_command(&write_job(straight.path(), 1), &[]));
    assert_eq!(uninterrupted[0]["steps_done"], STEPS);

    let stopped = tempfile::tempdir().unwrap();
    let job = write_job(stopped.path(), 1);
    let (output, stopped_in) =
        signal_after_step(train_command(&job, &[]), 20, |child| sigterm(child.id()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(143),
        "exit code after SIGTERM; stderr:\n{stderr}"
    );
    assert!(
        stopped_in < Duration::from_secs(25),
        "stopped in {stopped_in:?}, past the grace period"
    );
    let outcome = &outcomes(&output)[0];
    assert_eq!(outcome["stopped_by"], "SIGTERM");
    let step = outcome["steps_done"].as_u64().unwrap();
    assert!((20..STEPS).contains(&step), "stopped after step {step}");
    assert_eq!(
        latest_step(stopped.path()),
        Some(step),
        "a committed checkpoint of the last step"
    );

    let resumed = run_to_end(train_command(&job, &["--resume", "auto"]));
    assert_eq!(resumed[0]["resumed_from"], step);
    assert_eq!(
        resumed[0]["params_sha256"],
        uninterrupted[0]["params_sha256"]
    );
}

/// The pid of rank `rank` of the mpirun job whose command line names `job`.
fn rank_pid(job: &Path, rank: usize) -> u32 {
    let want_env = format!("OMPI_COMM_WORLD_RANK={rank}");
    let want_job = job.display().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.starts_with(ditrun()) || !cmdline.contains(&want_job) {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if environ
            .split(|&b| b == 0)
            .any(|var| var == want_env.as_bytes())
        {
            return pid;
        }
    }
    panic!("no rank {rank} process of {want_job}");
}

#[test]
fn sigterm_to_one_rank_stops_both_after_the_same_step_with_a_checkpoint() {
    let _one = serial();
    let straight = tempfile::tempdir().unwrap();
    let mut command = mpirun(2);
    command.args([
        ditrun(),
        "train",
        "--job",
        &write_job(straight.path(), 1).display().to_string(),
    ]);
    let uninterrupted = run_to_end(command);

    let stopped = tempfile::tempdir().unwrap();
    let job = write_job(stopped.path(), 1);
    let mut command = mpirun(2);
    command.args([ditrun(), "train", "--job", &job.display().to_string()]);
    let (output, _) = signal_after_step(command, 20, |_| sigterm(rank_pid(&job, 1)));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "mpirun reports the ranks' 143; stderr:\n{stderr}"
    );
    let reports = outcomes(&output);
    assert_eq!(
        reports.len(),
        2,
        "both ranks finished their stop; stderr:\n{stderr}"
    );
    assert_eq!(
        reports[0]["steps_done"], reports[1]["steps_done"],
        "the same step on both ranks"
    );
    assert_eq!(reports[0]["stopped_by"], "SIGTERM");
    assert_eq!(reports[1]["stopped_by"], "SIGTERM");
    assert_eq!(reports[0]["params_sha256"], reports[1]["params_sha256"]);
    let step = reports[0]["steps_done"].as_u64().unwrap();
    assert_eq!(latest_step(stopped.path()), Some(step));

    let mut command = mpirun(2);
    command.args([
        ditrun(),
        "train",
        "--job",
        &job.display().to_string(),
        "--resume",
        "auto",
    ]);
    let resumed = run_to_end(command);
    assert_eq!(resumed[0]["resumed_from"], step);
    assert_eq!(
        resumed[0]["params_sha256"],
        uninterrupted[0]["params_sha256"]
    );
}

/// `ditrun launch` of two ranks, allowed to restart (a stop that was asked for must not be).
fn launch_command(job: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(ditrun());
    command
        .args(["launch", "--nproc-per-node", "2", "--max-restarts", "2"])
        .args(["--mpirun-arg=--oversubscribe", "--", "train", "--job"])
        .arg(job)
        .args(extra)
        .env("RUST_LOG", "info");
    command
}

#[test]
fn sigterm_to_ditrun_launch_stops_every_rank_with_a_checkpoint_and_is_not_restarted() {
    let _one = serial();
    let straight = tempfile::tempdir().unwrap();
    let uninterrupted = run_to_end(launch_command(&write_job(straight.path(), 1), &[]));

    let stopped = tempfile::tempdir().unwrap();
    let job = write_job(stopped.path(), 1);
    let (output, stopped_in) = signal_after_step(launch_command(&job, &[]), 20, |launcher| {
        sigterm(launcher.id())
    });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(143),
        "the launcher ends with the ranks' code; stderr:\n{stderr}"
    );
    assert!(
        stopped_in < Duration::from_secs(25),
        "stopped in {stopped_in:?}"
    );
    assert!(
        !stderr.contains("restarting the job"),
        "a stop that was asked for is not restarted:\n{stderr}"
    );
    let reports = outcomes(&output);
    assert_eq!(reports.len(), 2, "both ranks saved and reported:\n{stderr}");
    assert_eq!(reports[0]["steps_done"], reports[1]["steps_done"]);
    assert_eq!(reports[0]["stopped_by"], "SIGTERM");
    let step = reports[0]["steps_done"].as_u64().unwrap();
    assert!((20..STEPS).contains(&step), "stopped after step {step}");
    assert_eq!(latest_step(stopped.path()), Some(step));

    let resumed = run_to_end(launch_command(&job, &["--resume", "auto"]));
    assert_eq!(resumed[0]["resumed_from"], step);
    assert_eq!(
        resumed[0]["params_sha256"],
        uninterrupted[0]["params_sha256"]
    );
}

#[test]
fn the_k8s_worker_entrypoint_passes_the_kubelet_s_sigterm_on_to_the_ranks_below_it() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), 1);
    // The entry point's daemon is the rank itself here; in the pod it is sshd, with the ranks
    // a few processes further down.
    let mut command = Command::new("bash");
    command
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/k8s/worker-entrypoint.sh"
        ))
        .args([ditrun(), "train", "--job"])
        .arg(&job)
        .env("RUST_LOG", "info");
    let (output, stopped_in) =
        signal_after_step(command, 20, |entrypoint| sigterm(entrypoint.id()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(143), "{stderr}");
    assert!(
        stopped_in < Duration::from_secs(25),
        "stopped in {stopped_in:?}"
    );
    assert!(
        stderr.contains("ditrun-worker: TERM: asking the ranks to stop"),
        "{stderr}"
    );
    let outcome = &outcomes(&output)[0];
    assert_eq!(outcome["stopped_by"], "SIGTERM", "{stderr}");
    assert_eq!(
        latest_step(dir.path()),
        outcome["steps_done"].as_u64(),
        "a committed checkpoint of the stop step"
    );
}

#[test]
fn sigkill_leaves_the_last_committed_checkpoint_as_the_latest_and_resume_ends_bit_identical() {
    let _one = serial();
    let straight = tempfile::tempdir().unwrap();
    let uninterrupted = run_to_end(train_command(
        &write_job_saving_every(straight.path(), 1, 10),
        &[],
    ));

    let killed = tempfile::tempdir().unwrap();
    let job = write_job_saving_every(killed.path(), 1, 10);
    // Right after step 40, whose checkpoint is being written in the background.
    let (output, _) = signal_after_step(train_command(&job, &[]), 40, |child| {
        signal(child.id(), libc::SIGKILL)
    });
    assert_eq!(output.status.code(), None, "killed, not exited");
    let latest = latest_step(killed.path()).expect("an earlier committed checkpoint");
    assert!(
        latest.is_multiple_of(10) && (10..=40).contains(&latest),
        "the latest is a committed checkpoint of the cadence, got step {latest}"
    );
    let resumed = run_to_end(train_command(&job, &["--resume", "auto"]));
    assert_eq!(resumed[0]["resumed_from"], latest);
    assert_eq!(
        resumed[0]["params_sha256"],
        uninterrupted[0]["params_sha256"]
    );
}

/// Rank 1's loss (and so, after the all-reduce, every rank's gradients) is NaN at step 15.
fn nan_on_rank_1_at_step_15(job: &Path, extra: &[&str]) -> Output {
    let mut command = mpirun(2);
    command
        .env("DITRUN_INJECT_NONFINITE_LOSS", "1:15")
        .env("RUST_LOG", "info")
        .args([ditrun(), "train", "--job", &job.display().to_string()])
        .args(extra);
    command.output().expect("mpirun starts")
}

#[test]
fn a_nan_on_rank_1_only_is_skipped_or_stops_on_both_ranks_at_the_same_step() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let output = nan_on_rank_1_at_step_15(
        &write_job(dir.path(), 1),
        &["--set", "train.on_nonfinite=skip"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let reports = outcomes(&output);
    assert_eq!(reports.len(), 2, "{stderr}");
    for report in &reports {
        assert_eq!(report["skipped_steps"], 1, "{report}");
        assert_eq!(report["steps_done"], STEPS);
    }
    assert_eq!(reports[0]["params_sha256"], reports[1]["params_sha256"]);
    assert!(
        stderr.contains("step skipped on every rank: the loss is NaN"),
        "rank 0 logs the skip:\n{stderr}"
    );
    assert!(reports[0]["final_loss"].as_f64().unwrap().is_finite());

    let dir = tempfile::tempdir().unwrap();
    let output = nan_on_rank_1_at_step_15(&write_job(dir.path(), 1), &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the default is to stop");
    for rank in 0..2 {
        assert!(
            stderr.contains(&format!(
                "error: rank {rank} of 2: training: step 15: the loss became NaN (train.on_nonfinite: stop)"
            )),
            "rank {rank} halts at step 15:\n{stderr}"
        );
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: sends a signal to a rank this test started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, signal) }, 0);
}

#[test]
fn a_throttled_rank_is_named_as_the_slowest_in_rank_0s_log() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), 1);
    let mut command = mpirun(2);
    command.args([ditrun(), "train", "--job", &job.display().to_string()]);
    // Rank 1 runs a quarter of the time for two seconds, as a rank on a throttled or shared
    // machine does: most of its pauses land in its own computation, which the others wait for.
    let (output, _) = signal_after_step(command, 20, |_| {
        let rank_1 = rank_pid(&job, 1);
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            signal(rank_1, libc::SIGSTOP);
            std::thread::sleep(Duration::from_millis(30));
            signal(rank_1, libc::SIGCONT);
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // "rank 1 is the slowest: busy 0.123 s over the last 1 steps, 8.20× the median ..."
    let ratios: Vec<f64> = stderr
        .lines()
        .filter_map(|line| line.split("rank 1 is the slowest: busy ").nth(1))
        .filter_map(|rest| rest.split(", ").nth(1)?.split('×').next()?.parse().ok())
        .collect();
    let far_behind = ratios.iter().filter(|&&ratio| ratio >= 3.0).count();
    assert!(
        far_behind >= 3,
        "rank 1 should be named at ≥ 3× the median in several reports: {ratios:?}\n{stderr}"
    );
}
