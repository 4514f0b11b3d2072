//! The Kubernetes manifests in k8s/ pass the offline check CI runs (scripts/validate-k8s.py:
//! Kubernetes' strict schemas, the MPIJob's schema, `ditrun inspect` of the mounted job, and
//! what ties them together), and broken copies of them fail with a message naming the
//! problem, so the check is known to catch what it claims to.
//!
//! Needs `DITRUN_PYTHON`, the venv python of scripts/python-venv.sh (with kubernetes-validate);
//! scripts/test.sh sets it.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

fn python() -> PathBuf {
    match std::env::var_os("DITRUN_PYTHON") {
        Some(python) => python.into(),
        None => panic!(
            "DITRUN_PYTHON is not set: these tests run scripts/validate-k8s.py with the venv \
             that scripts/python-venv.sh creates (it has kubernetes-validate). Run \
             `bash scripts/test.sh`, or `DITRUN_PYTHON=$(bash scripts/python-venv.sh) cargo \
             test --test k8s`"
        ),
    }
}

struct Outcome {
    success: bool,
    output: String,
}

impl Outcome {
    fn fail_lines(&self) -> Vec<&str> {
        self.output
            .lines()
            .filter(|line| line.starts_with("FAIL"))
            .collect()
    }

    /// Asserts that the check failed, on a FAIL line that contains every one of `needles`.
    fn assert_fails_with(&self, needles: &[&str]) {
        assert!(
            !self.success,
            "the check passed a broken manifest:\n{}",
            self.output
        );
        assert!(
            self.fail_lines()
                .iter()
                .any(|line| needles.iter().all(|n| line.contains(n))),
            "no FAIL line names all of {needles:?}:\n{}",
            self.output
        );
    }
}

fn validate(dir: &Path) -> Outcome {
    let script = Path::new(MANIFEST_DIR).join("scripts/validate-k8s.py");
    let output = Command::new(python())
        .arg(&script)
        .arg(dir)
        .env("DITRUN_BIN", env!("CARGO_BIN_EXE_ditrun"))
        .current_dir(MANIFEST_DIR)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    Outcome {
        success: output.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

fn shipped() -> PathBuf {
    Path::new(MANIFEST_DIR).join("k8s")
}

/// A copy of k8s/*.yaml with `file` changed by `edit` (which must change it).
fn broken_copy(file: &str, edit: impl FnOnce(&str) -> String) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(shipped()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let target = dir.path().join(file);
    let text = std::fs::read_to_string(&target).unwrap();
    let changed = edit(&text);
    assert_ne!(changed, text, "the edit of {file} changed nothing");
    std::fs::write(&target, changed).unwrap();
    dir
}

#[test]
fn shipped_manifests_pass() {
    let outcome = validate(&shipped());
    assert!(
        outcome.success,
        "scripts/validate-k8s.py k8s/ failed:\n{}",
        outcome.output
    );
    assert!(outcome.fail_lines().is_empty(), "{}", outcome.output);
    assert!(
        !outcome.output.contains("SKIP"),
        "nothing may be skipped with DITRUN_BIN set:\n{}",
        outcome.output
    );
    for expected in [
        "ConfigMap/ditrun-job: valid",
        "Secret/ditrun-credentials: valid",
        "MPIJob/ditrun-cifar10: valid (k8s/schemas/mpijob-v2beta1.json",
        "Job/ditrun-cifar10-single-node: valid",
        "Deployment/ditrun-tensorboard: valid",
        "Service/ditrun-tensorboard: valid",
        "Kustomization: valid",
        "ConfigMap/ditrun-job job.yaml: passes",
        "MPIJob/ditrun-cifar10: 8 ranks",
        "Deployment/ditrun-tensorboard: reads the job's logging.dir",
    ] {
        assert!(
            outcome
                .output
                .lines()
                .any(|l| l.starts_with("OK") && l.contains(expected)),
            "no OK line with {expected:?}:\n{}",
            outcome.output
        );
    }
}

#[test]
fn misspelled_field_in_a_deployment_fails() {
    let dir = broken_copy("tensorboard.yaml", |text| {
        text.replacen("imagePullPolicy:", "imagePullPolicyy:", 1)
    });
    let outcome = validate(dir.path());
    outcome.assert_fails_with(&[
        "tensorboard.yaml",
        "Deployment/ditrun-tensorboard",
        "spec.template.spec.containers[0]",
        "'imagePullPolicyy' was unexpected",
    ]);
    // Nothing else is wrong with the copy.
    assert_eq!(outcome.fail_lines().len(), 1, "{}", outcome.output);
}

#[test]
fn typo_inside_the_mpijob_worker_pod_spec_fails() {
    let dir = broken_copy("mpijob.yaml", |text| {
        // The Worker comes after the Launcher: its pod's `containers:` is the last one.
        let at = text.rfind("containers:").unwrap();
        assert!(text[..at].rfind("Worker:").unwrap() > text.find("Launcher:").unwrap());
        format!(
            "{}containrs:{}",
            &text[..at],
            &text[at + "containers:".len()..]
        )
    });
    let outcome = validate(dir.path());
    outcome.assert_fails_with(&[
        "mpijob.yaml",
        "MPIJob/ditrun-cifar10",
        "spec.mpiReplicaSpecs.Worker.template.spec",
        "'containrs' was unexpected",
    ]);
}

#[test]
fn unknown_key_in_the_configmap_job_fails_ditrun_inspect() {
    let dir = broken_copy("configmap-job.yaml", |text| {
        text.replacen("    train:\n", "    train:\n      lrr: 0.001\n", 1)
    });
    let outcome = validate(dir.path());
    outcome.assert_fails_with(&[
        "configmap-job.yaml",
        "ConfigMap/ditrun-job job.yaml",
        "ditrun inspect rejects it",
        "train.lrr: unknown key",
    ]);
}

#[test]
fn mpijob_whose_ranks_and_slots_disagree_fails() {
    let dir = broken_copy("mpijob.yaml", |text| {
        text.replacen("slotsPerWorker: 4", "slotsPerWorker: 8", 1)
    });
    let outcome = validate(dir.path());
    outcome.assert_fails_with(&[
        "MPIJob/ditrun-cifar10",
        "the Launcher starts 8 ranks but Worker replicas x slotsPerWorker = 2 x 8 = 16",
    ]);
    outcome.assert_fails_with(&["nvidia.com/gpu 4 but slotsPerWorker is 8"]);
}

#[test]
fn a_grace_period_shorter_than_the_job_s_stop_fails() {
    let dir = broken_copy("job-single-node.yaml", |text| {
        text.replacen(
            "terminationGracePeriodSeconds: 90",
            "terminationGracePeriodSeconds: 30",
            1,
        )
    });
    let outcome = validate(dir.path());
    outcome.assert_fails_with(&[
        "Job/ditrun-cifar10-single-node",
        "terminationGracePeriodSeconds 30 does not cover the job's train.stop_grace_secs 75",
    ]);
}

#[test]
fn kustomization_naming_a_missing_file_fails() {
    let dir = broken_copy("kustomization.yaml", |text| {
        text.replacen("- tensorboard.yaml", "- tensorbord.yaml", 1)
    });
    let outcome = validate(dir.path());
    outcome.assert_fails_with(&[
        "kustomization.yaml",
        "'tensorbord.yaml' is not a file beside it",
    ]);
}
