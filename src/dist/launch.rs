//! `ditrun launch`: starts one rank per GPU (or per CPU group) through `mpirun`, passes the
//! ranks' output through, and when the job fails restarts it from the latest committed
//! checkpoint up to `max_restarts` times. mpirun already ends every rank as soon as one dies;
//! the launcher reads which rank failed, and how, from mpirun's report.
//!
//! Stopping: SIGTERM, SIGINT or SIGHUP to the launcher is passed to every rank as the signal
//! mpirun forwards (SIGUSR1 for a SIGTERM or SIGHUP, SIGUSR2 for a SIGINT: `dist::signals`), so
//! the ranks agree on a step, save it and exit with 128 + the signal. A stop that was asked for
//! is never restarted, and the launcher exits with the ranks' code. mpirun runs in a process
//! group of its own: a terminal's Ctrl-C reaches only the launcher, never mpirun, whose own
//! SIGINT handling would kill the ranks a second later.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::signals::{self, StopSignal};
use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct LaunchOptions {
    /// Ranks on each node; `None` = [`auto_ranks_per_node`] (one node only).
    pub ranks: Option<usize>,
    /// Nodes in mpirun's hostfile; mpirun starts `nodes × ranks` ranks.
    pub nodes: usize,
    pub max_restarts: u32,
    /// The ditrun subcommand and its arguments, e.g. `train --job jobs/x.yaml`.
    pub command: Vec<String>,
    /// The binary the ranks run (this one).
    pub program: PathBuf,
    pub mpirun: String,
    /// Extra mpirun arguments (`--hostfile`, `--mca ...`).
    pub mpirun_args: Vec<String>,
}

/// How the last attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankFailure {
    pub rank: Option<usize>,
    /// The exit code to report: the rank's own, or 128 + signal.
    pub exit_code: i32,
    pub description: String,
}

/// GPUs this node shows (`CUDA_VISIBLE_DEVICES`, else `nvidia-smi -L`), else one CPU rank
/// per core, as torchrun's `auto` does: burn's CPU backends use a second thread poorly, and
/// two single-thread ranks trained the seed model 1.65–1.99× faster than one two-thread rank
/// on a 2-core machine (README, performance).
pub fn auto_ranks_per_node() -> (usize, &'static str) {
    if let Ok(visible) = std::env::var("CUDA_VISIBLE_DEVICES") {
        let count = visible
            .split(',')
            .filter(|d| !d.trim().is_empty() && d.trim() != "-1")
            .count();
        if count > 0 {
            return (count, "GPUs in CUDA_VISIBLE_DEVICES");
        }
    }
    if let Ok(output) = Command::new("nvidia-smi").arg("-L").output() {
        let count = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|l| l.starts_with("GPU "))
            .count();
        if output.status.success() && count > 0 {
            return (count, "GPUs listed by nvidia-smi -L");
        }
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (cores, "CPU ranks, one per core")
}

/// The mpirun command line of one attempt.
pub fn mpirun_command(options: &LaunchOptions, ranks: usize, restart: u32) -> Command {
    let mut command = Command::new(&options.mpirun);
    command.arg("-np").arg(ranks.to_string());
    if is_root() {
        // Containers often run as root, which OpenMPI refuses unless told.
        command.arg("--allow-run-as-root");
    }
    // Each rank runs several threads: mpirun's default of binding a rank to one core would
    // put them all on that core.
    command.args(["--bind-to", "none"]);
    command.args(&options.mpirun_args);
    command.arg(&options.program);
    command.args(attempt_arguments(&options.command, restart));
    command.env("DITRUN_LAUNCH_RESTART", restart.to_string());
    command
}

/// A restart continues from the latest checkpoint whatever `--resume` first said.
pub fn attempt_arguments(command: &[String], restart: u32) -> Vec<String> {
    if restart == 0 {
        return command.to_vec();
    }
    let mut out = Vec::with_capacity(command.len() + 2);
    let mut args = command.iter();
    while let Some(arg) = args.next() {
        if arg == "--resume" {
            args.next();
        } else if !arg.starts_with("--resume=") {
            out.push(arg.clone());
        }
    }
    if out.first().map(String::as_str) == Some("train") {
        out.extend(["--resume".to_string(), "auto".to_string()]);
    }
    out
}

/// Runs the job, restarting it after a failure; returns the exit code to end with.
pub fn launch(options: &LaunchOptions) -> Result<i32> {
    let (per_node, source) = match options.ranks {
        Some(n) => (n, "--nproc-per-node"),
        None if options.nodes > 1 => {
            // This node's GPUs say nothing of the others' (an MPIJob's launcher has none).
            return Err(Error::Config(
                "--nnodes above 1 needs a number for --nproc-per-node, not auto".into(),
            ));
        }
        None => auto_ranks_per_node(),
    };
    if per_node == 0 || options.nodes == 0 {
        return Err(Error::Config(
            "--nproc-per-node and --nnodes must be at least 1".into(),
        ));
    }
    let ranks = per_node * options.nodes;
    if options.command.is_empty() {
        return Err(Error::Config(
            "nothing to launch: give the ditrun subcommand after `--`, e.g. `-- train --job J`"
                .into(),
        ));
    }
    tracing::info!(
        ranks,
        nodes = options.nodes,
        source,
        max_restarts = options.max_restarts,
        "launching"
    );
    signals::install_for_launcher();
    let mut restart = 0;
    loop {
        if let Some(stop) = signals::launcher_stop() {
            // Asked to stop between two attempts: there is nothing running to save.
            return Ok(stopped_as_asked(stop, None).max(stop.exit_code()));
        }
        let attempt = run_attempt(options, ranks, restart)?;
        if let Some(stop) = signals::launcher_stop() {
            return Ok(stopped_as_asked(stop, attempt));
        }
        match attempt {
            None => {
                if restart > 0 {
                    tracing::info!(restarts = restart, "the job finished after restarting");
                }
                return Ok(0);
            }
            Some(failure) if restart < options.max_restarts => {
                restart += 1;
                tracing::warn!(
                    "{}; restarting the job from the latest committed checkpoint (restart {restart} of {})",
                    failure.description,
                    options.max_restarts
                );
                std::thread::sleep(Duration::from_secs(1));
            }
            Some(failure) => {
                tracing::error!(
                    "{}; giving up after {restart} restart(s), exit code {}",
                    failure.description,
                    failure.exit_code
                );
                return Ok(failure.exit_code);
            }
        }
    }
}

/// The exit code after a stop that was asked for: the ranks', as a restart would undo the stop.
fn stopped_as_asked(stop: StopSignal, attempt: Option<RankFailure>) -> i32 {
    let code = attempt.map_or(0, |failure| failure.exit_code);
    tracing::warn!(
        signal = stop.name(),
        exit_code = code,
        "the job stopped as asked: not restarting"
    );
    code
}

/// Waits for mpirun, passing each stop request on to it (and through it to every rank).
fn wait_forwarding_stops(child: &mut Child, mpirun: &str) -> Result<ExitStatus> {
    let pid = child.id() as libc::pid_t;
    loop {
        let (requests, first) = signals::take_launcher_requests();
        if let Some(stop) = first.filter(|_| requests > 0) {
            let forwarded = signals::forwarded_as(stop.0);
            tracing::warn!(
                signal = stop.name(),
                "asking every rank to stop after its current step (a second signal ends them at once)"
            );
            for _ in 0..requests {
                // SAFETY: plain kill(2) to our own child.
                unsafe { libc::kill(pid, forwarded) };
            }
        }
        if let Some(status) = child
            .try_wait()
            .map_err(|e| Error::Distributed(format!("waiting for {mpirun}: {e}")))?
        {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One mpirun; `None` when every rank succeeded.
fn run_attempt(options: &LaunchOptions, ranks: usize, restart: u32) -> Result<Option<RankFailure>> {
    let mut command = mpirun_command(options, ranks, restart);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = command.spawn().map_err(|e| {
        Error::Distributed(format!(
            "cannot start `{}`: {e} (install OpenMPI: apt-get install openmpi-bin, or pass --mpirun PATH)",
            options.mpirun
        ))
    })?;
    // Pass mpirun's (and the ranks') stderr through while keeping it for the failure report.
    let stderr = child.stderr.take().expect("stderr is piped");
    let reader = std::thread::spawn(move || {
        let mut kept = String::new();
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            let _ = writeln!(std::io::stderr(), "{line}");
            kept.push_str(&line);
            kept.push('\n');
        }
        kept
    });
    let status = wait_forwarding_stops(&mut child, &options.mpirun)?;
    let report = reader.join().unwrap_or_default();
    if status.success() {
        return Ok(None);
    }
    let mpirun_code = status.code().unwrap_or(1);
    Ok(Some(failure_from_report(&report, mpirun_code)))
}

/// Which rank failed and how, from mpirun's report (OpenMPI 4 and 5 wording); falls back to
/// mpirun's own exit code.
pub fn failure_from_report(report: &str, mpirun_code: i32) -> RankFailure {
    let number_after = |text: &str, key: &str| -> Option<i64> {
        let at = text.find(key)? + key.len();
        let digits: String = text[at..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse().ok()
    };
    let lines: Vec<&str> = report.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        // "mpirun noticed that process rank 1 with PID 123 on node x exited on signal 9 (Killed)."
        if line.contains("noticed that process rank") {
            let rank = number_after(line, "process rank").map(|r| r as usize);
            if let Some(signal) = number_after(line, "exited on signal") {
                return RankFailure {
                    rank,
                    exit_code: 128 + signal as i32,
                    description: format!("rank {} was killed by signal {signal}", fmt_rank(rank)),
                };
            }
        }
        // "MPI_ABORT was invoked on rank 1 in communicator MPI_COMM_WORLD\nwith errorcode 3."
        if line.contains("MPI_ABORT was invoked on rank") {
            let rank = number_after(line, "invoked on rank").map(|r| r as usize);
            let text = lines[i..(i + 2).min(lines.len())].join(" ");
            let code = number_after(&text, "errorcode").unwrap_or(mpirun_code as i64) as i32;
            return RankFailure {
                rank,
                exit_code: if code == 0 { 1 } else { code },
                description: format!(
                    "rank {} ended the job (MPI_Abort, exit code {code})",
                    fmt_rank(rank)
                ),
            };
        }
        // "The first process to do so was:\n  Process name: [[1234,1],1]\n  Exit code: 3"
        if line.trim_start().starts_with("Process name:") {
            let rank = line
                .rsplit(',')
                .next()
                .and_then(|r| r.trim_end_matches(']').trim().parse::<usize>().ok());
            let rest = lines[i..(i + 3).min(lines.len())].join(" ");
            if let Some(code) = number_after(&rest, "Exit code:") {
                return RankFailure {
                    rank,
                    exit_code: code as i32,
                    description: format!("rank {} exited with code {code}", fmt_rank(rank)),
                };
            }
        }
    }
    RankFailure {
        rank: None,
        exit_code: if mpirun_code == 0 { 1 } else { mpirun_code },
        description: format!("mpirun exited with code {mpirun_code}"),
    }
}

fn fmt_rank(rank: Option<usize>) -> String {
    rank.map(|r| r.to_string()).unwrap_or_else(|| "?".into())
}

fn is_root() -> bool {
    // Without a libc dependency: /proc/self/status holds "Uid: real effective ...".
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_rank_is_named_with_its_signal() {
        let report = "--------\nmpirun noticed that process rank 1 with PID 4242 on node box exited on signal 9 (Killed).\n--------\n";
        let failure = failure_from_report(report, 137);
        assert_eq!((failure.rank, failure.exit_code), (Some(1), 137));
        assert!(failure
            .description
            .contains("rank 1 was killed by signal 9"));
    }

    #[test]
    fn a_rank_exit_code_and_an_abort_are_read() {
        let exited = "mpirun detected that one or more processes exited with non-zero status, thus causing\n\
                      the job to be terminated. The first process to do so was:\n\n  Process name: [[14041,1],0]\n  Exit code:    4\n";
        let failure = failure_from_report(exited, 1);
        assert_eq!((failure.rank, failure.exit_code), (Some(0), 4));
        let aborted =
            "MPI_ABORT was invoked on rank 1 in communicator MPI_COMM_WORLD\nwith errorcode 3.\n";
        let failure = failure_from_report(aborted, 1);
        assert_eq!((failure.rank, failure.exit_code), (Some(1), 3));
        assert_eq!(failure_from_report("nothing useful", 2).exit_code, 2);
    }

    #[test]
    fn a_restart_resumes_from_the_latest_checkpoint() {
        let first: Vec<String> = ["train", "--job", "j.yaml", "--resume", "never"]
            .map(String::from)
            .to_vec();
        assert_eq!(attempt_arguments(&first, 0), first);
        assert_eq!(
            attempt_arguments(&first, 1),
            ["train", "--job", "j.yaml", "--resume", "auto"]
        );
        let inline: Vec<String> = ["train", "--resume=never"].map(String::from).to_vec();
        assert_eq!(attempt_arguments(&inline, 2), ["train", "--resume", "auto"]);
    }
}
