//! Shared by the integration tests: the reference folder and a CPU backend.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

use burn::prelude::*;
use ditrun::model::weights::SafetensorsFile;

/// The default CPU backend (`BackendKind::preferred`), so the tests check what users run.
#[cfg(feature = "ndarray")]
pub type TestBackend = burn::backend::NdArray;
#[cfg(all(not(feature = "ndarray"), feature = "flex"))]
pub type TestBackend = burn::backend::Flex;

/// `DITRUN_REFERENCE_DIR`, else `../shared/reference` beside the project.
pub fn reference_dir() -> PathBuf {
    std::env::var_os("DITRUN_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference"))
}

pub fn reference_file(relative: &str) -> SafetensorsFile {
    let path = reference_dir().join(relative);
    SafetensorsFile::read(&path).unwrap_or_else(|e| panic!("reference vectors: {e}"))
}

pub fn read_json(relative: &str) -> serde_json::Value {
    let path = reference_dir().join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn float<const D: usize>(file: &SafetensorsFile, name: &str) -> Tensor<TestBackend, D> {
    let data = file.tensor(name).unwrap().convert::<f32>();
    Tensor::from_data(data, &Default::default())
}

pub fn mask(file: &SafetensorsFile, name: &str) -> Tensor<TestBackend, 2, Bool> {
    let data = file.tensor(name).unwrap();
    let shape = data.shape.clone();
    let values: Vec<bool> = data
        .convert::<i64>()
        .into_vec::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v != 0)
        .collect();
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

pub fn scalar(file: &SafetensorsFile, name: &str) -> f64 {
    file.tensor(name)
        .unwrap()
        .convert::<f64>()
        .into_vec::<f64>()
        .unwrap()[0]
}

pub fn values<const D: usize, B: Backend>(tensor: Tensor<B, D>) -> Vec<f32> {
    tensor.into_data().convert::<f32>().into_vec().unwrap()
}

/// max |a - b| / max |b|: relative to the reference's scale, so entries near zero do not
/// dominate.
pub fn relative_error(actual: &[f32], expected: &[f32]) -> f64 {
    assert_eq!(actual.len(), expected.len(), "element count");
    let scale = expected.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
    let diff = actual
        .iter()
        .zip(expected)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    assert!(diff.is_finite(), "non-finite values");
    diff / scale.max(f64::MIN_POSITIVE)
}

/// A Fashion-MNIST image file (IDX, 28×28 u8) holding `images`.
pub fn idx_images(images: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = vec![0, 0, 8, 3];
    for dim in [images.len() as u32, 28, 28] {
        bytes.extend(dim.to_be_bytes());
    }
    images.iter().for_each(|image| bytes.extend(image));
    bytes
}

/// A Fashion-MNIST label file (IDX, u8) holding `labels`.
pub fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0, 0, 8, 1];
    bytes.extend((labels.len() as u32).to_be_bytes());
    bytes.extend(labels);
    bytes
}

/// CPU seconds this process has used (Linux), to report images per core-second.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The environment every test's `mpirun` runs with.
pub fn mpi_env(command: &mut Command) -> &mut Command {
    // CI and containers run as root, which OpenMPI refuses unless told.
    command
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("RUST_LOG", "info")
}

/// `mpirun -np ranks`, oversubscribed and unbound (the tests share two cores).
pub fn mpirun(ranks: usize) -> Command {
    let mut command = Command::new("mpirun");
    command.args([
        "-np",
        &ranks.to_string(),
        "--oversubscribe",
        "--bind-to",
        "none",
    ]);
    mpi_env(&mut command);
    command
}

/// Each rank prints its outcome as one JSON line; they come back ordered by rank.
pub fn outcomes(output: &Output) -> Vec<serde_json::Value> {
    let mut all: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).expect("an outcome line is JSON"))
        .collect();
    all.sort_by_key(|o| o["rank"].as_u64());
    all
}

/// Largest |a − b| / (1 + |b|): relative for large values, absolute near zero.
pub fn assert_close<B: Backend, const D: usize>(
    what: &str,
    actual: Tensor<B, D>,
    expected: Tensor<B, D>,
    tolerance: f32,
) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shapes");
    let (a, e) = (values(actual), values(expected));
    assert!(a.iter().all(|v| v.is_finite()), "{what}: non-finite values");
    let (worst, at) = a
        .iter()
        .zip(&e)
        .map(|(a, e)| (a - e).abs() / (1.0 + e.abs()))
        .enumerate()
        .fold(
            (0.0f32, 0),
            |best, (i, d)| if d > best.0 { (d, i) } else { best },
        );
    assert!(
        worst <= tolerance,
        "{what}: {worst:e} at {at} ({} vs {})",
        a[at],
        e[at]
    );
}

/// `DITRUN_PYTHON`, or the venv that scripts/python-venv.sh creates (once per test binary;
/// the script itself locks against other binaries doing the same).
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        if let Some(python) = std::env::var_os("DITRUN_PYTHON") {
            return python.into();
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/python-venv.sh");
        let output = Command::new("bash").arg(&script).output().unwrap();
        assert!(
            output.status.success(),
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
    })
}

pub fn read_with_tensorboard(run_dir: &Path) -> Value {
    run_reader(&[run_dir.as_os_str()])
}

pub fn run_reader(args: &[&std::ffi::OsStr]) -> Value {
    let reader = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tensorboard_read.py");
    let output = Command::new(python())
        .arg(reader)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "tensorboard_read.py failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}
