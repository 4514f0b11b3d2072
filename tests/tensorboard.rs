//! TensorBoard event files written by `ditrun::metrics`, read back by the real Python
//! `tensorboard` package (EventAccumulator, as TensorBoard loads them) and, for object-store
//! log dirs, by parsing the uploaded object's TFRecord framing here.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ditrun::metrics::proto::{event, summary, Event};
use ditrun::metrics::{image_grid, read_records, EventWriter, EventWriterOptions, HParamValue};
use object_store::ObjectStoreExt;
use prost::Message;
use serde_json::Value;

mod common;

use common::{python, read_with_tensorboard, run_reader};

/// A 32×32 image whose pixels depend on its index, so cells of a grid are distinguishable.
fn test_image(index: usize, channels: usize) -> Vec<u8> {
    (0..32 * 32 * channels)
        .map(|i| ((i * 7 + index * 40) % 256) as u8)
        .collect()
}

fn object_bytes(url: &str) -> Vec<u8> {
    let (store, path) = ditrun::storage::object_store_for(url).unwrap();
    ditrun::storage::block_on(async { store.get(&path).await.unwrap().bytes().await.unwrap() })
        .to_vec()
}

fn decode_events(bytes: &[u8], source: &str) -> Vec<Event> {
    read_records(bytes, source)
        .unwrap()
        .into_iter()
        .map(|record| Event::decode(record).unwrap())
        .collect()
}

fn scalars(events: &[Event], tag: &str) -> Vec<(i64, f32)> {
    events
        .iter()
        .filter_map(|event| match &event.what {
            Some(event::What::Summary(summary)) => Some((event.step, summary)),
            _ => None,
        })
        .flat_map(|(step, summary)| summary.value.iter().map(move |value| (step, value)))
        .filter(|(_, value)| value.tag == tag)
        .filter_map(|(step, value)| match value.kind {
            Some(summary::value::Kind::SimpleValue(x)) => Some((step, x)),
            _ => None,
        })
        .collect()
}

fn memory_options() -> EventWriterOptions {
    EventWriterOptions {
        upload_every: Duration::ZERO,
        upload_timeout: Duration::from_secs(5),
    }
}

#[test]
fn event_accumulator_reads_scalars_images_text_and_hparams() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = EventWriter::create(dir.path().to_str().unwrap(), "run-a").unwrap();

    let losses: Vec<(u64, f64)> = (1..=5).map(|step| (step * 10, 1.0 / step as f64)).collect();
    for &(step, loss) in &losses {
        writer.scalar("train/loss", step, loss).unwrap();
    }
    writer.scalar("train/lr", 10, 1e-4).unwrap();

    let rgb: Vec<Vec<u8>> = (0..6).map(|index| test_image(index, 3)).collect();
    let (grid, grid_height, grid_width) = image_grid(&rgb, 32, 32, 3, 3);
    writer
        .image_with_description(
            "samples/grid",
            50,
            grid_height,
            grid_width,
            3,
            &grid,
            "a photo of a cat | a photo of a dog",
        )
        .unwrap();
    let gray: Vec<Vec<u8>> = (0..2).map(|index| test_image(index, 1)).collect();
    let (gray_grid, gray_height, gray_width) = image_grid(&gray, 32, 32, 1, 1);
    writer
        .image("samples/gray", 50, gray_height, gray_width, 1, &gray_grid)
        .unwrap();

    let config = "```yaml\ntrain:\n  lr: 0.0001\n  batch_size: 64\n```";
    writer.text("config", 0, config).unwrap();

    let hparams = BTreeMap::from([
        ("train.lr".to_string(), HParamValue::from(1e-4)),
        ("train.batch_size".to_string(), HParamValue::from(64usize)),
        ("optimizer".to_string(), HParamValue::from("adamw")),
        ("ema".to_string(), HParamValue::from(true)),
    ]);
    writer.hparams(&hparams, &["train/loss"]).unwrap();
    let event_file = writer.local_path().to_path_buf();
    writer.close().unwrap();
    assert_eq!(event_file.parent().unwrap(), dir.path().join("run-a"));

    let read = read_with_tensorboard(&dir.path().join("run-a"));
    // EventAccumulator keeps the number after "brain.Event:".
    assert_eq!(read["file_version"], 2.0);

    let loss = read["scalars"]["train/loss"].as_array().unwrap();
    assert_eq!(loss.len(), losses.len());
    for (point, &(step, value)) in loss.iter().zip(&losses) {
        assert_eq!(point[0].as_u64(), Some(step));
        assert!(
            (point[1].as_f64().unwrap() - value).abs() < 1e-6,
            "{point} vs {value}"
        );
    }
    assert!((read["scalars"]["train/lr"][0][1].as_f64().unwrap() - 1e-4).abs() < 1e-9);

    // Two rows of three 32-px cells and one row of two gray cells, 1-px separators between.
    let expected_sizes = [
        (
            "samples/grid",
            (grid_width, grid_height),
            (3 * 32 + 2, 2 * 32 + 1),
        ),
        ("samples/gray", (gray_width, gray_height), (32, 2 * 32 + 1)),
    ];
    for (tag, (width, height), formula) in expected_sizes {
        assert_eq!((width, height), formula, "{tag}: image_grid size");
        let image = &read["images"][tag][0];
        assert_eq!(image["step"], 50, "{tag}");
        assert_eq!(image["width"].as_u64(), Some(width as u64), "{tag}");
        assert_eq!(image["height"].as_u64(), Some(height as u64), "{tag}");
        assert_eq!(
            image["png_size"],
            serde_json::json!([width, height]),
            "{tag}"
        );
    }
    assert_eq!(
        read["image_descriptions"]["samples/grid"],
        "a photo of a cat | a photo of a dog"
    );

    assert_eq!(read["texts"]["config"], serde_json::json!([[0, [config]]]));

    let session = &read["hparams"]["_hparams_/session_start_info"]["session_start_info"];
    // json_format prints google.protobuf.Value as the plain JSON value it holds.
    assert_eq!(session["hparams"]["train.lr"], 1e-4);
    assert_eq!(session["hparams"]["train.batch_size"], 64.0);
    assert_eq!(session["hparams"]["optimizer"], "adamw");
    assert_eq!(session["hparams"]["ema"], true);
    let experiment = &read["hparams"]["_hparams_/experiment"]["experiment"];
    let infos: Vec<(&str, &str)> = experiment["hparam_infos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|info| {
            (
                info["name"].as_str().unwrap(),
                info["type"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        infos,
        vec![
            ("ema", "DATA_TYPE_BOOL"),
            ("optimizer", "DATA_TYPE_STRING"),
            ("train.batch_size", "DATA_TYPE_FLOAT64"),
            ("train.lr", "DATA_TYPE_FLOAT64"),
        ]
    );
    assert_eq!(experiment["metric_infos"][0]["name"]["tag"], "train/loss");
}

#[test]
fn hparams_tab_lists_the_run_with_its_hparams_and_last_metric() {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().to_str().unwrap();
    let losses = [(100u64, 0.5), (200, 0.375)];
    for (run, lr) in [("lr-small", 1e-4), ("lr-large", 1e-3)] {
        let mut writer = EventWriter::create(log_dir, run).unwrap();
        let hparams = BTreeMap::from([
            ("train.lr".to_string(), HParamValue::from(lr)),
            ("dataset".to_string(), HParamValue::from("cifar10")),
        ]);
        writer.hparams(&hparams, &["loss"]).unwrap();
        for (step, loss) in losses {
            writer.scalar("loss", step, loss * lr * 1e4).unwrap();
        }
        writer.close().unwrap();
    }

    let tab = run_reader(&["--hparams-tab".as_ref(), dir.path().as_os_str()]);
    let names: Vec<&str> = tab["experiment"]["hparam_infos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|info| info["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["dataset", "train.lr"], "{tab:#}");
    assert_eq!(
        tab["experiment"]["metric_infos"][0]["name"]["tag"], "loss",
        "{tab:#}"
    );

    let groups = tab["session_groups"]["session_groups"]
        .as_array()
        .unwrap_or_else(|| panic!("no session groups: {tab:#}"));
    assert_eq!(groups.len(), 2, "{tab:#}");
    for (run, lr) in [("lr-small", 1e-4), ("lr-large", 1e-3)] {
        let group = groups
            .iter()
            .find(|group| group["name"].as_str().unwrap().ends_with(run))
            .unwrap_or_else(|| panic!("no session group for {run}: {tab:#}"));
        assert_eq!(group["hparams"]["train.lr"], lr);
        assert_eq!(group["hparams"]["dataset"], "cifar10");
        let metric = &group["metric_values"][0];
        let (last_step, last_loss) = losses[losses.len() - 1];
        assert_eq!(metric["training_step"].as_u64(), Some(last_step), "{tab:#}");
        let expected = last_loss * lr * 1e4;
        assert!(
            (metric["value"].as_f64().unwrap() - expected).abs() < 1e-6,
            "{tab:#}"
        );
    }
}

#[test]
fn memory_log_dir_uploads_a_parseable_event_file() {
    let mut writer =
        EventWriter::create_with("memory://tensorboard-test/upload", "run", memory_options())
            .unwrap();
    let url = writer.location().to_string();
    assert!(
        url.starts_with("memory://tensorboard-test/upload/run/events.out.tfevents."),
        "{url}"
    );
    writer.scalar("loss", 1, 0.5).unwrap();
    writer.scalar("loss", 2, 0.25).unwrap();
    writer.flush().unwrap();
    assert_eq!(writer.last_upload_error(), None);
    let events = decode_events(&object_bytes(&url), &url);
    assert_eq!(
        events[0].what,
        Some(event::What::FileVersion("brain.Event:2".into()))
    );
    assert_eq!(scalars(&events, "loss"), vec![(1, 0.5), (2, 0.25)]);

    writer.scalar("loss", 3, 0.125).unwrap();
    let spool = writer.local_path().to_path_buf();
    writer.close().unwrap();
    let events = decode_events(&object_bytes(&url), &url);
    assert_eq!(
        scalars(&events, "loss"),
        vec![(1, 0.5), (2, 0.25), (3, 0.125)]
    );
    assert!(
        !spool.exists(),
        "the spool {} should go once uploaded",
        spool.display()
    );
}

#[test]
fn dropping_a_writer_uploads_what_it_holds() {
    let mut writer =
        EventWriter::create_with("memory://tensorboard-test/drop", "", memory_options()).unwrap();
    let url = writer.location().to_string();
    writer.scalar("loss", 9, 2.0).unwrap();
    drop(writer);
    assert_eq!(
        scalars(&decode_events(&object_bytes(&url), &url), "loss"),
        vec![(9, 2.0)]
    );
}

#[test]
fn periodic_upload_happens_without_flush() {
    let options = EventWriterOptions {
        upload_every: Duration::from_millis(20),
        upload_timeout: Duration::from_secs(5),
    };
    let mut writer =
        EventWriter::create_with("memory://tensorboard-test/periodic", "run", options).unwrap();
    let url = writer.location().to_string();
    let (store, path) = ditrun::storage::object_store_for(&url).unwrap();
    writer.scalar("loss", 1, 1.0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut step = 1;
    loop {
        std::thread::sleep(Duration::from_millis(25));
        step += 1;
        writer.scalar("loss", step, 1.0).unwrap();
        if ditrun::storage::block_on(store.head(&path)).is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no periodic upload of {url} within 3 s"
        );
    }
    let uploaded = decode_events(&object_bytes(&url), &url);
    assert!(!scalars(&uploaded, "loss").is_empty());
    writer.close().unwrap();
}

#[test]
fn failed_upload_is_logged_kept_and_retried_at_the_next_flush() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the log dir's folder should be makes every put fail until it goes.
    let blocker = dir.path().join("blocked");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let log_dir = format!("file://{}/tb", blocker.display());
    let mut writer = EventWriter::create_with(&log_dir, "run", memory_options()).unwrap();
    writer.scalar("loss", 1, 0.75).unwrap();
    writer.flush().unwrap();
    let error = writer
        .last_upload_error()
        .expect("the upload should have failed")
        .to_string();
    assert!(error.contains(&log_dir), "{error}");
    let spooled = std::fs::read(writer.local_path()).unwrap();
    assert_eq!(
        scalars(&decode_events(&spooled, "spool"), "loss"),
        vec![(1, 0.75)]
    );

    std::fs::remove_file(&blocker).unwrap();
    writer.scalar("loss", 2, 0.5).unwrap();
    writer.flush().unwrap();
    assert_eq!(writer.last_upload_error(), None);
    let file_name = writer.local_path().file_name().unwrap().to_owned();
    writer.close().unwrap();

    let run_dir = blocker.join("tb/run");
    let uploaded = std::fs::read(run_dir.join(file_name)).unwrap();
    assert_eq!(
        scalars(&decode_events(&uploaded, "uploaded"), "loss"),
        vec![(1, 0.75), (2, 0.5)]
    );
    let read = read_with_tensorboard(&run_dir);
    assert_eq!(
        read["scalars"]["loss"],
        serde_json::json!([[1, 0.75], [2, 0.5]])
    );
}

#[test]
fn unsupported_log_dir_scheme_names_the_url() {
    let message = EventWriter::create("ftp://host/logs", "run")
        .err()
        .unwrap()
        .to_string();
    assert!(message.contains("ftp://host/logs"), "{message}");
}

#[test]
fn uncreatable_local_log_dir_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let log_dir = file.join("logs");
    let message = EventWriter::create(log_dir.to_str().unwrap(), "run")
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.contains(&log_dir.display().to_string()),
        "{message}"
    );
}

#[test]
fn two_writers_in_one_run_never_share_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().to_str().unwrap();
    let first = EventWriter::create(log_dir, "run").unwrap();
    let second = EventWriter::create(log_dir, "run").unwrap();
    assert_ne!(first.local_path(), second.local_path());
}

// ---------------------------------------------------------------------------------------------
// The real TensorBoard server
// ---------------------------------------------------------------------------------------------

/// TensorBoard on 127.0.0.1 over `log_dir`, stopped when dropped.
struct TensorBoardServer {
    child: std::process::Child,
    base: String,
}

impl TensorBoardServer {
    fn start(log_dir: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(python())
            .args([
                "-m",
                "tensorboard.main",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            // The pure-Python loader: the Rust data server is an optional binary download.
            .args(["--load_fast", "false", "--reload_interval", "1", "--logdir"])
            .arg(log_dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tensorboard starts");
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    fn get(&self, path: &str) -> Option<Vec<u8>> {
        let mut response = ureq::get(&format!("{}{path}", self.base)).call().ok()?;
        response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .ok()
    }

    fn json(&self, path: &str) -> Option<Value> {
        serde_json::from_slice(&self.get(path)?).ok()
    }

    /// Polls `path` until `ready` accepts its JSON (the server loads event files in the
    /// background after it starts).
    fn wait_for(&self, path: &str, ready: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            if let Some(value) = self.json(path).filter(|v| ready(v)) {
                return value;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "TensorBoard never served {path} as expected"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for TensorBoardServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_tensorboard_server_shows_a_short_run_s_scalars_and_sample_images() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display();
    let yaml = format!(
        r#"
name: tb-run
model: {{ image_size: 8, patch_size: 4, channels: 3, dim: 16, depth: 1, heads: 2, mlp_ratio: 2.0, context_dim: 32 }}
text_encoder: {{ hidden_size: 32, intermediate_size: 64, layers: 2, heads: 2 }}
data:
  shards: {root}/shards
  prepare: {{ dataset: synthetic, samples: 32, samples_per_shard: 16 }}
train: {{ steps: 4, batch_size: 8, lr: 1.0e-3, seed: 3, threads: 1 }}
checkpoint: {{ url: "" }}
logging: {{ dir: {root}/tensorboard, every_steps: 1 }}
sample: {{ every_steps: 2, prompts: ["a photo of a red circle", "a photo of a blue square"], steps: 2, per_prompt: 2, cfg_sweep: [1, 4] }}
"#
    );
    let job = ditrun::config::JobSpec::from_yaml(&yaml, "tb-run.yaml").unwrap();
    ditrun::train::train(&job, &ditrun::train::Resume::Never).unwrap();

    let server = TensorBoardServer::start(&dir.path().join("tensorboard"));
    let runs = server.wait_for("/data/runs", |runs| {
        runs.as_array().is_some_and(|r| !r.is_empty())
    });
    assert_eq!(runs, serde_json::json!(["tb-run"]));

    let wanted = [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/images_per_sec",
    ];
    let tags = server.wait_for("/data/plugin/scalars/tags", |tags| {
        wanted.iter().all(|tag| tags["tb-run"].get(tag).is_some())
    });
    assert!(
        tags["tb-run"].get("train/data_wait_secs").is_some(),
        "{tags}"
    );
    let loss = server
        .json("/data/plugin/scalars/scalars?run=tb-run&tag=train/loss")
        .expect("the loss series");
    let steps: Vec<u64> = loss
        .as_array()
        .unwrap()
        .iter()
        .map(|point| point[1].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    assert!(loss
        .as_array()
        .unwrap()
        .iter()
        .all(|point| point[2].as_f64().unwrap().is_finite()));

    let image_tags = server.wait_for("/data/plugin/images/tags", |tags| {
        tags["tb-run"].get("samples").is_some()
    });
    let description = image_tags["tb-run"]["samples"]["description"]
        .as_str()
        .unwrap_or_default();
    assert!(
        description.contains("a photo of a red circle"),
        "the prompts travel with the grid: {description}"
    );
    let images = server
        .json("/data/plugin/images/images?run=tb-run&tag=samples")
        .expect("the image series");
    let images = images.as_array().unwrap();
    let steps: Vec<u64> = images
        .iter()
        .map(|image| image["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [2, 4]);
    let query = images[1]["query"].as_str().unwrap();
    let png = server
        .get(&format!("/data/plugin/images/individualImage?{query}"))
        .expect("the PNG");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "TensorBoard serves the grid as a PNG"
    );

    // `sample.cfg_sweep`: the labelled sweep beside each grid, at the sweep's own size.
    let image_tags = server.wait_for("/data/plugin/images/tags", |tags| {
        tags["tb-run"].get("samples/cfg_sweep").is_some()
    });
    let description = image_tags["tb-run"]["samples/cfg_sweep"]["description"]
        .as_str()
        .unwrap_or_default();
    assert!(description.contains("columns: cfg 1, 4"), "{description}");
    let sweeps = server
        .json("/data/plugin/images/images?run=tb-run&tag=samples/cfg_sweep")
        .expect("the sweep series");
    let sweeps = sweeps.as_array().unwrap();
    let steps: Vec<u64> = sweeps
        .iter()
        .map(|image| image["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [2, 4]);
    let query = sweeps[1]["query"].as_str().unwrap();
    let png = server
        .get(&format!("/data/plugin/images/individualImage?{query}"))
        .expect("the sweep PNG");
    let reader = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .unwrap();
    let prompts = job.sample.prompts.clone();
    assert_eq!(
        (reader.info().width as usize, reader.info().height as usize),
        ditrun::viz::sweep_canvas_size(&prompts, 2, 8)
    );
}
