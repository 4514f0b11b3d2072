//! The training loop end to end on a tiny model: exact resume, a non-finite loss, sampling
//! and inspecting what a run wrote.

mod common;

use std::path::Path;

use ditrun::checkpoint::CheckpointStore;
use ditrun::config::JobSpec;
use ditrun::train::{train, train_until, Resume, MODEL_FILE};

/// A job small enough for a test: 8×8 images, one block, a 2-layer 32-wide text encoder.
fn tiny_job(root: &Path, steps: u64) -> JobSpec {
    let yaml = format!(
        r#"
name: tiny
model: {{ image_size: 8, patch_size: 4, channels: 3, dim: 16, depth: 1, heads: 2, mlp_ratio: 2.0, context_dim: 32 }}
text_encoder: {{ hidden_size: 32, intermediate_size: 64, layers: 2, heads: 2 }}
data:
  shards: {root}/shards
  prepare: {{ dataset: synthetic, samples: 64, samples_per_shard: 16 }}
  shuffle_window: 2
  prefetch: 2
train: {{ steps: {steps}, batch_size: 8, lr: 1.0e-3, warmup_steps: 2, grad_clip: 1.0, ema_decay: 0.9, seed: 7, text_drop_prob: 0.2, backend: auto, threads: 2 }}
checkpoint: {{ url: {root}/checkpoints, every_steps: 2, keep_last: 3 }}
logging: {{ dir: {root}/tensorboard, every_steps: 1 }}
sample: {{ every_steps: 0, at_end: true, prompts: ["a photo of a red circle", "a photo of a blue square"], cfg: 3.0, steps: 3, per_prompt: 2, dir: {root}/samples }}
"#,
        root = root.display()
    );
    JobSpec::from_yaml(&yaml, "tiny-job.yaml").expect("the test job is valid")
}

fn model_bytes(root: &Path, step: u64) -> Vec<u8> {
    let store = CheckpointStore::open(&format!("{}/checkpoints", root.display()), 3).unwrap();
    store.load(step).unwrap().files[MODEL_FILE].to_vec()
}

#[test]
fn a_resumed_run_ends_with_bit_identical_weights() {
    let straight = tempfile::tempdir().unwrap();
    let outcome = train(&tiny_job(straight.path(), 6), &Resume::Never).unwrap();
    assert_eq!(outcome.steps_done, 6);
    assert!(outcome.final_loss.is_finite());

    let interrupted = tempfile::tempdir().unwrap();
    let stopped = train_until(&tiny_job(interrupted.path(), 6), &Resume::Never, Some(4)).unwrap();
    assert_eq!(stopped.steps_done, 4);
    let resumed = train(&tiny_job(interrupted.path(), 6), &Resume::Auto).unwrap();
    assert_eq!(resumed.resumed_from, Some(4));

    let (a, b) = (
        model_bytes(straight.path(), 4),
        model_bytes(interrupted.path(), 4),
    );
    let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert!(
        a == b,
        "same steps before the stop: {differing} of {} bytes differ",
        a.len()
    );

    assert_eq!(
        model_bytes(straight.path(), 6),
        model_bytes(interrupted.path(), 6)
    );
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = tiny_job(dir.path(), 8);
    // Far too large a step without clipping: the weights blow up within a few steps.
    job.train.lr = 1.0e12;
    job.train.warmup_steps = 0;
    job.train.grad_clip = 0.0;
    job.checkpoint.every_steps = 1;
    let error = train(&job, &Resume::Never).unwrap_err().to_string();
    // "training: step 4: the loss became NaN (train.on_nonfinite: stop); stopping. ..."
    assert!(
        error.contains("the loss became") && error.contains("train.on_nonfinite: stop"),
        "{error}"
    );
    let failed_step: u64 = error
        .split("step ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .expect("the message names the step");
    let store = CheckpointStore::open(&format!("{}/checkpoints", dir.path().display()), 3).unwrap();
    let latest = store
        .latest_valid()
        .unwrap()
        .expect("the good steps were checkpointed");
    assert_eq!(latest.state.step, failed_step - 1);
}

#[test]
fn sampling_and_inspect_read_what_training_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = tiny_job(dir.path(), 2);
    job.sample.cfg_sweep = Some(vec![1.0, 5.0]);
    let outcome = train(&job, &Resume::Never).unwrap();
    let grid = outcome.sample_grid.expect("at_end sampling writes a grid");
    assert!(grid.ends_with("step-000000002.png"), "{grid}");
    let sweep = std::fs::read(dir.path().join("samples/cfg-sweep-step-000000002.png"))
        .expect("sample.cfg_sweep writes a sweep");
    let reader = png::Decoder::new(std::io::Cursor::new(sweep))
        .read_info()
        .unwrap();
    assert_eq!(
        (reader.info().width as usize, reader.info().height as usize),
        ditrun::viz::sweep_canvas_size(&job.sample.prompts, 2, 8)
    );

    let checkpoint =
        ditrun::sample::TrainedCheckpoint::load(&format!("{}/checkpoints", dir.path().display()))
            .unwrap();
    let prompts: Vec<String> = vec![
        "a photo of a red circle".into(),
        "a photo of a green triangle".into(),
    ];
    let options = ditrun::flow::SampleOptions {
        cfg: 2.0,
        steps: 2,
        sampler: ditrun::flow::Sampler::Heun,
        per_prompt: 3,
        seed: 1,
    };
    let out_dir = dir.path().join("images");
    let written = ditrun::with_backend!(checkpoint.backend().unwrap(), B => {
        ditrun::sample::sample_checkpoint::<B>(&checkpoint, &prompts, &options, None, Some(&out_dir))
    })
    .unwrap();
    assert_eq!(written.len(), 6);
    assert!(
        written[0].ends_with("a-photo-of-a-red-circle-000.png"),
        "{:?}",
        written[0]
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&written[5]).unwrap(),
    ));
    let info = decoder.read_info().unwrap().info().clone();
    assert_eq!((info.width, info.height), (8, 8));

    let picture = dir.path().join("cross-attention.png");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ditrun"))
        .args(["inspect", "cross-attention", "--checkpoint"])
        .arg(dir.path().join("checkpoints"))
        .args([
            "--prompt",
            "a photo of a red circle",
            "--steps",
            "4",
            "--times",
            "1,0.5",
            "--block",
            "0",
            "--json",
            "--out",
        ])
        .arg(&picture)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        report["tokens"],
        serde_json::json!(["<start>", "a", "photo", "of", "a", "red", "circle", "<end>"])
    );
    assert_eq!(report["rows"].as_array().unwrap().len(), 2);
    assert_eq!(
        report["rows"][0]["maps"].as_array().unwrap().len(),
        8,
        "a map per token"
    );
    assert!(std::fs::read(&picture).unwrap().starts_with(b"\x89PNG"));

    let checkpoint = ditrun::inspect::inspect(&format!(
        "{}/checkpoints/step-000000002",
        dir.path().display()
    ))
    .unwrap();
    assert_eq!(checkpoint["kind"], "checkpoint");
    assert_eq!(checkpoint["state"]["step"], 2);
    let shards = ditrun::inspect::inspect(&format!("{}/shards", dir.path().display())).unwrap();
    assert_eq!(shards["kind"], "shards");
    assert_eq!(shards["index"]["total_samples"], 64);
}

/// A job that prepares a real dataset on first use: its channels come from the dataset
/// (Fashion-MNIST: 1), and the shards must fit the model before training starts.
#[test]
fn a_job_prepares_fashion_mnist_on_first_use_and_trains_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("fashion");
    std::fs::create_dir_all(&raw).unwrap();
    let images: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i * 15; 28 * 28]).collect();
    let labels: Vec<u8> = (0..16u8).map(|i| i % 10).collect();
    std::fs::write(
        raw.join("train-images-idx3-ubyte"),
        common::idx_images(&images),
    )
    .unwrap();
    std::fs::write(
        raw.join("train-labels-idx1-ubyte"),
        common::idx_labels(&labels),
    )
    .unwrap();
    let mut job = tiny_job(dir.path(), 2);
    job.model.image_size = 32;
    job.model.channels = 1;
    job.sample.prompts = vec!["a photo of an ankle boot".into()];
    let yaml = job
        .to_yaml()
        .replace("dataset: synthetic", "dataset: fashion-mnist");
    let mut job = JobSpec::from_yaml(&yaml, "fashion-job.yaml").unwrap();
    job.data.prepare.as_mut().unwrap().source = Some(raw.display().to_string());
    job.data.prepare.as_mut().unwrap().samples = None;
    let outcome = train(&job, &Resume::Never).unwrap();
    assert_eq!(outcome.steps_done, 2);
    let index = ditrun::data::read_index(&format!("{}/shards", dir.path().display())).unwrap();
    assert_eq!(
        (index.channels, index.image_size, index.total_samples),
        (1, 32, 16)
    );
    assert!(index
        .captions
        .contains(&"a photo of an ankle boot".to_string()));
}

#[test]
fn sampling_refuses_a_checkpoint_whose_text_encoder_weights_changed() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("clip-text.safetensors");
    std::fs::copy(
        common::reference_dir().join("clip_tiny/model.safetensors"),
        &weights,
    )
    .unwrap();
    let mut job = tiny_job(dir.path(), 2);
    job.text_encoder.weights = Some(weights.display().to_string());
    job.sample.at_end = false;
    train(&job, &Resume::Never).unwrap();

    let load = || {
        ditrun::sample::TrainedCheckpoint::load(&format!("{}/checkpoints", dir.path().display()))
            .unwrap()
    };
    let sample = |checkpoint: &ditrun::sample::TrainedCheckpoint| {
        checkpoint
            .ema_model::<common::TestBackend>()
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    sample(&load()).expect("the encoder it trained with");

    // Another CLIP text tower of the same sizes behind the same location.
    std::fs::copy(
        common::reference_dir().join("clip_score_tiny/model.safetensors"),
        &weights,
    )
    .unwrap();
    let message = sample(&load()).expect_err("another encoder");
    assert!(
        message.contains("trained with the text encoder sha256:")
            && message.contains(&weights.display().to_string()),
        "{message}"
    );
}
