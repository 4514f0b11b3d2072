//! FID and CLIP score end to end, with the reference networks (random weights, so the numbers
//! are not comparable to papers): the dataset's statistics are computed once and stored beside
//! its shards; held-out real images are far closer to them than noise; `ditrun eval` reports
//! FID and CLIP score, and two ranks give one rank's FID; a training run logs `eval/fid` to
//! TensorBoard at its cadence and records it in the checkpoint.
//!
//! Inception on the CPU takes about a second per image here, so every set is a few images.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::{mpirun, outcomes, read_with_tensorboard, reference_dir, TestBackend};
use ditrun::data::shards::{read_index, read_shard};
use ditrun::dist::SingleProcess;
use ditrun::eval::{EvalSetup, Evaluator};

fn ditrun() -> &'static str {
    env!("CARGO_BIN_EXE_ditrun")
}

fn inception() -> String {
    reference_dir()
        .join("inception_fid/model.safetensors")
        .display()
        .to_string()
}

fn clip() -> String {
    reference_dir()
        .join("clip_score_tiny/model.safetensors")
        .display()
        .to_string()
}

/// A tiny job on synthetic shapes, evaluated every 10 steps on 4 samples against 8 real images.
fn write_job(root: &Path, steps: u64) -> PathBuf {
    write_job_with(root, steps, 10, "every_steps: 10")
}

/// [`write_job`] evaluated every `eval_every` steps, with `checkpoint` the fields of the
/// checkpoint section besides its URL.
fn write_job_with(root: &Path, steps: u64, eval_every: u64, checkpoint: &str) -> PathBuf {
    let yaml = format!(
        r#"
name: tiny-eval
model: {{ image_size: 8, patch_size: 4, channels: 3, dim: 16, depth: 1, heads: 2, mlp_ratio: 2.0, context_dim: 32 }}
text_encoder: {{ hidden_size: 32, intermediate_size: 64, layers: 2, heads: 2 }}
data:
  shards: {root}/shards
  prepare: {{ dataset: synthetic, samples: 64, samples_per_shard: 16 }}
train: {{ steps: {steps}, batch_size: 8, lr: 1.0e-3, seed: 7, threads: 1 }}
checkpoint: {{ url: {root}/checkpoints, {checkpoint} }}
logging: {{ dir: {root}/tensorboard, every_steps: 10 }}
sample: {{ every_steps: 0, at_end: false }}
eval:
  every_steps: {eval_every}
  samples: 4
  cfg: [2.0]
  steps: 3
  batch_size: 8
  reference_samples: 8
  inception_weights: {inception}
  clip_weights: {clip}
"#,
        root = root.display(),
        inception = inception(),
        clip = clip(),
    );
    let path = root.join("job.yaml");
    std::fs::create_dir_all(root).unwrap();
    std::fs::write(&path, yaml).unwrap();
    path
}

fn run_ok(mut command: Command) -> std::process::Output {
    let output = command.output().expect("the command starts");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn held_out_real_images_are_far_closer_to_the_dataset_than_noise() {
    let dir = tempfile::tempdir().unwrap();
    let shards = dir.path().join("shards").display().to_string();
    let mut options =
        ditrun::data::PrepareOptions::new(ditrun::data::DatasetKind::Synthetic, &shards);
    options.samples = Some(64);
    options.samples_per_shard = 16;
    options.image_size = Some(8);
    ditrun::data::prepare_with(&options).unwrap();

    let device = Default::default();
    let open = || {
        let inception = inception();
        let setup = EvalSetup {
            shards: &shards,
            inception_weights: &inception,
            reference_samples: 8,
            batch_size: 8,
            per_caption_fid: false,
        };
        Evaluator::<TestBackend>::open(&setup, None, &SingleProcess, &device).unwrap()
    };
    let evaluator = open();
    assert_eq!(evaluator.reference_images(), 8);
    let stats_file = dir.path().join("shards/fid-stats.safetensors");
    let written = std::fs::metadata(&stats_file).expect("stored beside the shards");
    // Opened again, the stored statistics serve: the file is not rewritten.
    drop(open());
    let reread = std::fs::metadata(&stats_file).unwrap();
    assert_eq!(written.modified().unwrap(), reread.modified().unwrap());

    let index = read_index(&shards).unwrap();
    let held_out = read_shard(&shards, &index, 3).unwrap();
    let real: Vec<&[u8]> = held_out[..8].iter().map(|s| s.pixels.as_slice()).collect();
    let noise: Vec<Vec<u8>> = (0..8u64)
        .map(|n| {
            (0..8 * 8 * 3u64)
                .map(|p| ((n * 7919 + p * 104_729) % 251) as u8)
                .collect()
        })
        .collect();
    let noise: Vec<&[u8]> = noise.iter().map(Vec::as_slice).collect();
    let fid_real = evaluator.fid_of_images(&real, 8, 3).unwrap();
    let fid_noise = evaluator.fid_of_images(&noise, 8, 3).unwrap();
    assert!(fid_real.is_finite() && fid_noise.is_finite());
    assert!(
        fid_real < 0.5 * fid_noise,
        "FID of held-out images {fid_real} should be far below that of noise {fid_noise}"
    );
}

fn eval_command(job_root: &Path) -> Vec<String> {
    [
        ditrun(),
        "eval",
        "--checkpoint",
        &job_root.join("checkpoints").display().to_string(),
        "--samples",
        "4",
        "--cfg",
        "1,3",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn ditrun_eval_reports_fid_and_clip_score_and_two_ranks_give_one_rank_s_fid() {
    let dir = tempfile::tempdir().unwrap();
    let mut train = Command::new(ditrun());
    let job = write_job(dir.path(), 10);
    train
        .args(["train", "--job", &job.display().to_string()])
        .args(["--set", "eval.every_steps=0"]);
    run_ok(train);

    let args = eval_command(dir.path());
    let mut one = Command::new(&args[0]);
    one.args(&args[1..]);
    let one = outcomes(&run_ok(one));
    assert_eq!(one.len(), 2, "one report per guidance scale");
    for (report, cfg) in one.iter().zip([1.0, 3.0]) {
        assert_eq!(report["cfg"], cfg);
        assert_eq!(report["samples"], 4);
        assert_eq!(report["reference_images"], 8);
        assert!(report["fid"].as_f64().unwrap().is_finite(), "{report}");
        let score = report["clip_score"].as_f64().expect("a CLIP score");
        assert!((0.0..=100.0).contains(&score), "{report}");
    }

    let mut two = mpirun(2);
    two.args(&args);
    let two = outcomes(&run_ok(two));
    assert_eq!(two.len(), 2, "rank 0 alone reports");
    for (one, two) in one.iter().zip(&two) {
        let (a, b) = (one["fid"].as_f64().unwrap(), two["fid"].as_f64().unwrap());
        // The features are f32 products, and one rank runs them on both cores where each of two
        // ranks has one: the thread split rounds differently (about 1e-7 relative here).
        assert!(
            (a - b).abs() <= 1e-6 * a.abs().max(1.0),
            "cfg {}: one rank {a}, two ranks {b}",
            one["cfg"]
        );
    }
}

#[test]
fn a_training_run_logs_eval_fid_to_tensorboard_and_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), 20);
    let mut train = Command::new(ditrun());
    train.args(["train", "--job", &job.display().to_string()]);
    let output = run_ok(train);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.matches("evaluated").count(), 2, "{stderr}");

    let events = read_with_tensorboard(&dir.path().join("tensorboard/tiny-eval"));
    let fid = &events["scalars"]["eval/fid"];
    let steps: Vec<u64> = fid
        .as_array()
        .unwrap_or_else(|| panic!("no eval/fid in {events}"))
        .iter()
        .map(|point| point[0].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [10, 20]);
    assert!(events["scalars"]["eval/clip_score"].is_array(), "{events}");

    let state =
        std::fs::read_to_string(dir.path().join("checkpoints/step-000000020/state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let recorded = state["extra"]["eval"][0]["fid"].as_f64().unwrap();
    let logged = fid[1][1].as_f64().unwrap();
    assert!(
        (recorded - logged).abs() <= 1e-6 * recorded.abs(),
        "state.json {recorded}, TensorBoard {logged}"
    );
}

#[test]
fn keep_best_fid_keeps_the_lowest_fid_step_apart_from_the_last_one() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job_with(
        dir.path(),
        30,
        5,
        "every_steps: 10, keep_last: 1, keep_best: fid",
    );
    let mut train = Command::new(ditrun());
    train.args(["train", "--job", &job.display().to_string()]);
    run_ok(train);

    let events = read_with_tensorboard(&dir.path().join("tensorboard/tiny-eval"));
    let fids: Vec<(u64, f64)> = events["scalars"]["eval/fid"]
        .as_array()
        .unwrap_or_else(|| panic!("no eval/fid in {events}"))
        .iter()
        .map(|point| (point[0].as_u64().unwrap(), point[1].as_f64().unwrap()))
        .collect();
    assert_eq!(fids.len(), 6, "{fids:?}");
    let (best_step, best_fid) = fids
        .iter()
        .copied()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();

    let checkpoints = dir.path().join("checkpoints");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(checkpoints.join("best.json")).unwrap()).unwrap();
    assert_eq!(
        record["step"].as_u64(),
        Some(best_step),
        "{record} vs {fids:?}"
    );
    assert_eq!(record["metric"], "fid");
    let recorded = record["value"].as_f64().unwrap();
    // TensorBoard stores f32.
    assert!(
        (recorded - best_fid).abs() <= 1e-6 * best_fid.abs(),
        "{recorded} vs {best_fid}"
    );

    let mut kept: Vec<String> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("step-"))
        .collect();
    kept.sort();
    // Here FID falls to the last step, so the best is usually the last one: retention keeping
    // an older best apart is tested in tests/checkpoint.rs.
    let mut expected = vec![format!("step-{best_step:09}"), "step-000000030".to_string()];
    expected.dedup();
    expected.sort();
    assert_eq!(kept, expected, "the best apart from the last one");

    let mut inspect = Command::new(ditrun());
    let best_url = checkpoints.join("best").display().to_string();
    inspect.args(["inspect", &best_url]);
    let output = run_ok(inspect);
    let shown: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["state"]["step"].as_u64(), Some(best_step), "{shown}");
}

#[test]
fn per_caption_fid_covers_every_caption_and_two_ranks_agree() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), 10);
    let mut train = Command::new(ditrun());
    train
        .args(["train", "--job", &job.display().to_string()])
        .args(["--set", "eval.every_steps=0"]);
    run_ok(train);
    let shards = dir.path().join("shards").display().to_string();
    let captions = read_index(&shards).unwrap().captions;

    // Two samples of each caption, against every real image (several per caption).
    let samples = (2 * captions.len()).to_string();
    let mut args = eval_command(dir.path());
    args.truncate(4);
    args.extend(
        [
            "--samples",
            &samples,
            "--cfg",
            "3",
            "--reference-samples",
            "0",
            "--per-caption-fid",
        ]
        .map(String::from),
    );
    let mut one = Command::new(&args[0]);
    one.args(&args[1..]);
    let one = outcomes(&run_ok(one));
    let per_caption = one[0]["fid_per_caption"]
        .as_object()
        .unwrap_or_else(|| panic!("no fid_per_caption in {}", one[0]));
    let named: Vec<&String> = per_caption.keys().collect();
    let mut expected: Vec<&String> = captions.iter().collect();
    expected.sort();
    assert_eq!(named, expected, "one FID per caption");
    for (caption, fid) in per_caption {
        let fid = fid.as_f64().unwrap();
        assert!(fid.is_finite() && fid > 0.0, "{caption}: {fid}");
    }
    assert!(dir
        .path()
        .join("shards/fid-stats-per-caption/index.json")
        .is_file());

    // Two ranks reuse the stored statistics and gather the labelled features on rank 0.
    let mut two = mpirun(2);
    two.args(&args);
    let two = outcomes(&run_ok(two));
    for (caption, fid) in per_caption {
        let (a, b) = (
            fid.as_f64().unwrap(),
            two[0]["fid_per_caption"][caption].as_f64(),
        );
        let b = b.unwrap_or_else(|| panic!("two ranks: no FID for {caption}: {}", two[0]));
        assert!(
            (a - b).abs() <= 1e-6 * a.abs(),
            "{caption}: one rank {a}, two ranks {b}"
        );
    }
}
