//! A TensorBoard event-file writer: scalars, PNG images, markdown text and hparams, written
//! to a local directory or to any object store (through a local spool file that is uploaded
//! whole, periodically and at the end).
//!
//! A log dir written as a plain path is appended to in place (TensorBoard can read it live);
//! one written as a URL, `file://` included, is a [`Location`] and gets the spool.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use prost::Message;

use super::png_image::encode_png_for;
use super::proto::{
    event, hparams_plugin_data, proto_value, summary, summary_metadata, tensor_shape_proto,
    DataClass, Event, Experiment, HParamDataType, HParamInfo, HParamsPluginData, MetricInfo,
    MetricName, ProtoValue, SessionStartInfo, Summary, SummaryMetadata, TensorDataType,
    TensorProto, TensorShapeProto,
};
use super::record::frame_record;
use crate::error::{Error, Result};
use crate::storage::{scheme_of, Location};

/// What a TensorBoard reader requires as the first record of every event file.
pub const FILE_VERSION: &str = "brain.Event:2";

/// Tags under which the hparams plugin looks for its data (`tensorboard.plugins.hparams.metadata`).
pub const HPARAMS_EXPERIMENT_TAG: &str = "_hparams_/experiment";
pub const HPARAMS_SESSION_START_TAG: &str = "_hparams_/session_start_info";

/// One hyperparameter value as the HPARAMS tab shows it.
#[derive(Clone, Debug, PartialEq)]
pub enum HParamValue {
    Number(f64),
    Text(String),
    Bool(bool),
}

impl From<f64> for HParamValue {
    fn from(value: f64) -> Self {
        HParamValue::Number(value)
    }
}

impl From<f32> for HParamValue {
    fn from(value: f32) -> Self {
        HParamValue::Number(value.into())
    }
}

impl From<usize> for HParamValue {
    fn from(value: usize) -> Self {
        HParamValue::Number(value as f64)
    }
}

impl From<u64> for HParamValue {
    fn from(value: u64) -> Self {
        HParamValue::Number(value as f64)
    }
}

impl From<bool> for HParamValue {
    fn from(value: bool) -> Self {
        HParamValue::Bool(value)
    }
}

impl From<&str> for HParamValue {
    fn from(value: &str) -> Self {
        HParamValue::Text(value.to_string())
    }
}

impl From<String> for HParamValue {
    fn from(value: String) -> Self {
        HParamValue::Text(value)
    }
}

/// How often events reach their destination.
#[derive(Clone, Debug)]
pub struct EventWriterOptions {
    /// At most this long between uploads of the spool to an object store, and between flushes
    /// of a local file to disk. Zero means only on `flush`, `close` and drop.
    pub upload_every: Duration,
    /// One upload attempt gives up after this long (a store that is down must not hold up the
    /// end of training for the store client's full retry schedule).
    pub upload_timeout: Duration,
}

impl Default for EventWriterOptions {
    fn default() -> Self {
        EventWriterOptions {
            upload_every: Duration::from_secs(30),
            upload_timeout: Duration::from_secs(120),
        }
    }
}

/// Writes one TensorBoard event file (`events.out.tfevents.<secs>.<host>.<pid>`) for one run.
///
/// With an object-store log dir (`s3://`, `gs://`, `az://`, `memory://`, `file://`) events
/// are appended to a local spool file that a background thread uploads whole; a failed upload
/// is logged and retried at the next upload, never returned as an error, so a flaky store
/// cannot stop training. The spool is deleted only after the final upload succeeded.
pub struct EventWriter {
    file: BufWriter<File>,
    local_path: PathBuf,
    location: String,
    bytes_written: u64,
    upload_every: Duration,
    last_sync: Instant,
    remote: Option<Remote>,
    finished: bool,
}

impl EventWriter {
    /// A writer for `log_dir/run_name/` with the default options; `run_name` may be empty.
    pub fn create(log_dir: &str, run_name: &str) -> Result<Self> {
        Self::create_with(log_dir, run_name, EventWriterOptions::default())
    }

    pub fn create_with(log_dir: &str, run_name: &str, options: EventWriterOptions) -> Result<Self> {
        if scheme_of(log_dir).is_some() {
            return Self::create_in(&Location::parse(log_dir)?, run_name, options);
        }
        let dir = FsPath::new(log_dir).join(run_name);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join(event_file_name());
        let location = path.display().to_string();
        Self::open(path, location, None, &options)
    }

    /// A writer for `log_dir/run_name/` in an object store (`file://` included), through a
    /// local spool file; `run_name` may be empty.
    pub fn create_in(
        log_dir: &Location,
        run_name: &str,
        options: EventWriterOptions,
    ) -> Result<Self> {
        let file_name = event_file_name();
        let object = log_dir.join(run_name)?.join(&file_name)?;
        let url = object.url().to_string();
        let spool_dir = std::env::temp_dir()
            .join("ditrun-tensorboard")
            .join(format!("{}-{}", std::process::id(), next_writer_number()));
        std::fs::create_dir_all(&spool_dir).map_err(|e| Error::io(&spool_dir, e))?;
        let spool = spool_dir.join(file_name);
        let remote = Remote::start(object, spool.clone(), options.upload_timeout);
        Self::open(spool, url, Some(remote), &options)
    }

    /// Creates the event file and writes the version record every event file starts with.
    fn open(
        path: PathBuf,
        location: String,
        remote: Option<Remote>,
        options: &EventWriterOptions,
    ) -> Result<Self> {
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut writer = EventWriter {
            file: BufWriter::new(file),
            local_path: path,
            location,
            bytes_written: 0,
            upload_every: options.upload_every,
            last_sync: Instant::now(),
            remote,
            finished: false,
        };
        writer.write_event(Event {
            wall_time: wall_time(),
            step: 0,
            what: Some(event::What::FileVersion(FILE_VERSION.to_string())),
        })?;
        Ok(writer)
    }

    /// Where readers find the events: the local file path or the object URL.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The local file being appended to (the spool for object-store log dirs).
    pub fn local_path(&self) -> &FsPath {
        &self.local_path
    }

    /// The last upload's failure, cleared by the next successful upload.
    pub fn last_upload_error(&self) -> Option<&str> {
        self.remote.as_ref()?.last_error.as_deref()
    }

    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<()> {
        self.write_value(
            step,
            summary::Value {
                tag: tag.to_string(),
                metadata: None,
                kind: Some(summary::value::Kind::SimpleValue(value as f32)),
            },
        )
    }

    /// A `height`×`width` image with `channels` (1 gray, 2 gray+alpha, 3 RGB, 4 RGBA)
    /// interleaved u8 samples per pixel, row-major.
    pub fn image(
        &mut self,
        tag: &str,
        step: u64,
        height: usize,
        width: usize,
        channels: usize,
        pixels: &[u8],
    ) -> Result<()> {
        self.image_with_description(tag, step, height, width, channels, pixels, "")
    }

    /// [`image`](Self::image) with a markdown description that TensorBoard shows beside the
    /// card (e.g. the prompts of a sample grid).
    #[allow(clippy::too_many_arguments)]
    pub fn image_with_description(
        &mut self,
        tag: &str,
        step: u64,
        height: usize,
        width: usize,
        channels: usize,
        pixels: &[u8],
        description: &str,
    ) -> Result<()> {
        let encoded = encode_png_for(&format!("image `{tag}`"), pixels, height, width, channels)?;
        let metadata = (!description.is_empty()).then(|| SummaryMetadata {
            summary_description: description.to_string(),
            ..Default::default()
        });
        let image = summary::Image {
            height: dimension(tag, "height", height)?,
            width: dimension(tag, "width", width)?,
            colorspace: channels as i32,
            encoded_image_string: encoded,
        };
        self.write_value(
            step,
            summary::Value {
                tag: tag.to_string(),
                metadata,
                kind: Some(summary::value::Kind::Image(image)),
            },
        )
    }

    /// Markdown text for the TEXT tab (the text plugin's scalar string tensor).
    pub fn text(&mut self, tag: &str, step: u64, markdown: &str) -> Result<()> {
        let tensor = TensorProto {
            dtype: TensorDataType::DtString as i32,
            tensor_shape: Some(TensorShapeProto { dim: Vec::new() }),
            float_val: Vec::new(),
            string_val: vec![markdown.as_bytes().to_vec()],
        };
        self.write_value(
            step,
            summary::Value {
                tag: tag.to_string(),
                metadata: Some(plugin_metadata("text", Vec::new(), DataClass::Tensor)),
                kind: Some(summary::value::Kind::Tensor(tensor)),
            },
        )
    }

    /// The run's hyperparameters and the scalar tags that the HPARAMS tab should show as
    /// metrics beside them. Call once per run, before or after the first scalars.
    pub fn hparams(
        &mut self,
        hparams: &BTreeMap<String, HParamValue>,
        metrics: &[&str],
    ) -> Result<()> {
        let now = wall_time();
        let experiment = Experiment {
            time_created_secs: now,
            hparam_infos: hparams
                .iter()
                .map(|(name, value)| hparam_info(name, value))
                .collect(),
            metric_infos: metrics.iter().map(|tag| metric_info(tag)).collect(),
            ..Default::default()
        };
        let session = SessionStartInfo {
            hparams: hparams
                .iter()
                .map(|(name, value)| (name.clone(), proto_value(value)))
                .collect(),
            start_time_secs: now,
            ..Default::default()
        };
        let values = vec![
            hparams_value(
                HPARAMS_EXPERIMENT_TAG,
                hparams_plugin_data::Data::Experiment(experiment),
            ),
            hparams_value(
                HPARAMS_SESSION_START_TAG,
                hparams_plugin_data::Data::SessionStartInfo(session),
            ),
        ];
        self.write_event(Event {
            wall_time: now,
            step: 0,
            what: Some(event::What::Summary(Summary { value: values })),
        })
    }

    /// Makes everything written so far durable: on disk, and for object stores uploaded
    /// (waiting for the upload; a failed upload is logged and kept for the next try).
    pub fn flush(&mut self) -> Result<()> {
        self.flush_file()?;
        if let Some(remote) = &mut self.remote {
            remote.upload_now(self.bytes_written);
        }
        Ok(())
    }

    /// Flushes, uploads a last time and stops the upload thread; see [`flush`](Self::flush).
    pub fn close(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        self.flush_file()?;
        let Some(mut remote) = self.remote.take() else {
            return Ok(());
        };
        remote.upload_now(self.bytes_written);
        let uploaded = remote.last_error.is_none();
        remote.stop();
        if uploaded {
            remove_spool(&self.local_path);
        } else {
            tracing::warn!(
                spool = %self.local_path.display(),
                url = %self.location,
                "TensorBoard events could not be uploaded; the spool file is kept"
            );
        }
        Ok(())
    }

    fn write_value(&mut self, step: u64, value: summary::Value) -> Result<()> {
        self.write_event(Event {
            wall_time: wall_time(),
            step: i64::try_from(step).unwrap_or(i64::MAX),
            what: Some(event::What::Summary(Summary { value: vec![value] })),
        })
    }

    fn write_event(&mut self, event: Event) -> Result<()> {
        let mut framed = Vec::new();
        frame_record(&event.encode_to_vec(), &mut framed);
        self.file
            .write_all(&framed)
            .map_err(|e| Error::io(&self.local_path, e))?;
        self.bytes_written += framed.len() as u64;
        self.sync_if_due()
    }

    fn sync_if_due(&mut self) -> Result<()> {
        if let Some(remote) = &mut self.remote {
            remote.collect_finished();
        }
        if self.upload_every.is_zero() || self.last_sync.elapsed() < self.upload_every {
            return Ok(());
        }
        self.last_sync = Instant::now();
        self.flush_file()?;
        if let Some(remote) = &mut self.remote {
            remote.start_upload(self.bytes_written);
        }
        Ok(())
    }

    fn flush_file(&mut self) -> Result<()> {
        self.file
            .flush()
            .map_err(|e| Error::io(&self.local_path, e))
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if let Err(error) = self.finish() {
            tracing::warn!(file = %self.local_path.display(), %error, "closing TensorBoard event file");
        }
    }
}

/// The upload side of an object-store writer: a thread that puts the first `len` bytes of the
/// spool file (only whole records, because `len` is counted after each record) to the object.
struct Remote {
    url: String,
    jobs: Option<Sender<u64>>,
    outcomes: Receiver<(u64, std::result::Result<(), String>)>,
    worker: Option<JoinHandle<()>>,
    in_flight: bool,
    uploaded_bytes: Option<u64>,
    last_error: Option<String>,
}

impl Remote {
    fn start(object: Location, spool: PathBuf, timeout: Duration) -> Self {
        let url = object.url().to_string();
        let (jobs, job_queue) = crossbeam_channel::unbounded::<u64>();
        let (outcome_sender, outcomes) = crossbeam_channel::unbounded();
        let worker = std::thread::Builder::new()
            .name("tensorboard-upload".into())
            .spawn(move || {
                for len in job_queue {
                    let result = upload_prefix(&object, &spool, len, timeout);
                    if outcome_sender.send((len, result)).is_err() {
                        break;
                    }
                }
            })
            .expect("cannot start the TensorBoard upload thread");
        Remote {
            url,
            jobs: Some(jobs),
            outcomes,
            worker: Some(worker),
            in_flight: false,
            uploaded_bytes: None,
            last_error: None,
        }
    }

    /// Starts an upload unless one is running or the store already has these bytes.
    fn start_upload(&mut self, len: u64) {
        if self.in_flight || self.uploaded_bytes == Some(len) {
            return;
        }
        if let Some(jobs) = &self.jobs {
            self.in_flight = jobs.send(len).is_ok();
        }
    }

    fn upload_now(&mut self, len: u64) {
        self.wait_in_flight();
        self.start_upload(len);
        self.wait_in_flight();
    }

    fn wait_in_flight(&mut self) {
        if self.in_flight {
            match self.outcomes.recv() {
                Ok(outcome) => self.record(outcome),
                Err(_) => self.in_flight = false,
            }
        }
    }

    fn collect_finished(&mut self) {
        while let Ok(outcome) = self.outcomes.try_recv() {
            self.record(outcome);
        }
    }

    fn record(&mut self, (len, result): (u64, std::result::Result<(), String>)) {
        self.in_flight = false;
        match result {
            Ok(()) => {
                self.uploaded_bytes = Some(len);
                self.last_error = None;
            }
            Err(reason) => {
                tracing::warn!(url = %self.url, %reason, "TensorBoard upload failed; retrying at the next upload");
                self.last_error = Some(format!("upload to {} failed: {reason}", self.url));
            }
        }
    }

    fn stop(&mut self) {
        self.jobs = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

fn upload_prefix(
    object: &Location,
    spool: &FsPath,
    len: u64,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let mut bytes = Vec::with_capacity(len as usize);
    File::open(spool)
        .and_then(|file| file.take(len).read_to_end(&mut bytes))
        .map_err(|e| format!("reading spool {}: {e}", spool.display()))?;
    match object.put_within(bytes, timeout) {
        Some(Ok(())) => Ok(()),
        // The message names the URL already; the store's own words are the reason.
        Some(Err(Error::ObjectStore { source, .. })) => Err(source.to_string()),
        Some(Err(other)) => Err(other.to_string()),
        None => Err(format!("no answer within {timeout:?}")),
    }
}

fn remove_spool(path: &FsPath) {
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir(dir);
    }
}

fn dimension(tag: &str, name: &str, size: usize) -> Result<i32> {
    i32::try_from(size).map_err(|_| Error::TensorBoard {
        what: format!("image `{tag}`"),
        reason: format!("{name} {size} does not fit the event format's int32"),
    })
}

fn plugin_metadata(plugin: &str, content: Vec<u8>, data_class: DataClass) -> SummaryMetadata {
    SummaryMetadata {
        plugin_data: Some(summary_metadata::PluginData {
            plugin_name: plugin.to_string(),
            content,
        }),
        data_class: data_class as i32,
        ..Default::default()
    }
}

fn hparams_value(tag: &str, data: hparams_plugin_data::Data) -> summary::Value {
    let content = HParamsPluginData {
        version: 0,
        data: Some(data),
    }
    .encode_to_vec();
    // TensorBoard's data provider only lists values that carry a tensor, hence the empty
    // float vector of Python's `hparams.metadata.NULL_TENSOR`.
    let null_tensor = TensorProto {
        dtype: TensorDataType::DtFloat as i32,
        tensor_shape: Some(TensorShapeProto {
            dim: vec![tensor_shape_proto::Dim { size: 0 }],
        }),
        float_val: Vec::new(),
        string_val: Vec::new(),
    };
    summary::Value {
        tag: tag.to_string(),
        metadata: Some(plugin_metadata("hparams", content, DataClass::Tensor)),
        kind: Some(summary::value::Kind::Tensor(null_tensor)),
    }
}

fn hparam_info(name: &str, value: &HParamValue) -> HParamInfo {
    let data_type = match value {
        HParamValue::Number(_) => HParamDataType::DataTypeFloat64,
        HParamValue::Text(_) => HParamDataType::DataTypeString,
        HParamValue::Bool(_) => HParamDataType::DataTypeBool,
    };
    HParamInfo {
        name: name.to_string(),
        r#type: data_type as i32,
        ..Default::default()
    }
}

fn metric_info(tag: &str) -> MetricInfo {
    MetricInfo {
        name: Some(MetricName {
            group: String::new(),
            tag: tag.to_string(),
        }),
        ..Default::default()
    }
}

fn proto_value(value: &HParamValue) -> ProtoValue {
    let kind = match value {
        HParamValue::Number(number) => proto_value::Kind::NumberValue(*number),
        HParamValue::Text(text) => proto_value::Kind::StringValue(text.clone()),
        HParamValue::Bool(flag) => proto_value::Kind::BoolValue(*flag),
    };
    ProtoValue { kind: Some(kind) }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or(0.0)
}

fn next_writer_number() -> u64 {
    static WRITERS: AtomicU64 = AtomicU64::new(0);
    WRITERS.fetch_add(1, Ordering::Relaxed)
}

/// TensorBoard's naming, plus a per-process counter after the first writer so two writers of
/// one process in the same second never share a file.
fn event_file_name() -> String {
    static FILES: AtomicU64 = AtomicU64::new(0);
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    let base = format!(
        "events.out.tfevents.{secs}.{}.{}",
        hostname(),
        std::process::id()
    );
    match FILES.fetch_add(1, Ordering::Relaxed) {
        0 => base,
        n => format!("{base}.{n}"),
    }
}

fn hostname() -> String {
    let raw = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|file| std::fs::read_to_string(file).ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::record::read_records;

    fn read_events(path: &FsPath) -> Vec<Event> {
        let bytes = std::fs::read(path).unwrap();
        read_records(&bytes, &path.display().to_string())
            .unwrap()
            .into_iter()
            .map(|record| Event::decode(record).unwrap())
            .collect()
    }

    #[test]
    fn file_starts_with_the_version_record_and_keeps_step_and_value() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = EventWriter::create(dir.path().to_str().unwrap(), "run").unwrap();
        writer.scalar("loss", 7, 0.25).unwrap();
        let path = writer.local_path().to_path_buf();
        writer.close().unwrap();
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        assert!(
            name.ends_with(&format!(".{}", std::process::id()))
                || name.contains(&format!(".{}.", std::process::id()))
        );
        let events = read_events(&path);
        assert_eq!(
            events[0].what,
            Some(event::What::FileVersion(FILE_VERSION.into()))
        );
        let Some(event::What::Summary(summary)) = &events[1].what else {
            panic!("second record is not a summary: {:?}", events[1]);
        };
        assert_eq!(events[1].step, 7);
        assert_eq!(summary.value[0].tag, "loss");
        assert_eq!(
            summary.value[0].kind,
            Some(summary::value::Kind::SimpleValue(0.25))
        );
    }

    #[test]
    fn wrong_pixel_count_names_the_tag_and_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = EventWriter::create(dir.path().to_str().unwrap(), "").unwrap();
        let message = writer
            .image("samples/grid", 1, 4, 5, 3, &[0; 59])
            .unwrap_err()
            .to_string();
        assert!(message.contains("samples/grid"), "{message}");
        assert!(
            message.contains("59") && message.contains("60"),
            "{message}"
        );
        let message = writer
            .image("gray", 1, 2, 2, 5, &[0; 20])
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("`gray`") && message.contains("5 channels"),
            "{message}"
        );
    }
}
