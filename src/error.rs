//! One error type for the whole crate, so every failure names the file, tensor, URL or key
//! it is about and what was expected there.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{file}: not a valid safetensors file: {reason}")]
    Safetensors { file: String, reason: String },

    #[error("{file}: missing tensor `{name}`{hint}")]
    MissingTensor {
        file: String,
        name: String,
        /// A nearby name or prefix note, so a wrong checkpoint is recognisable at a glance.
        hint: String,
    },

    #[error("{file}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        file: String,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{file}: tensor `{name}` has dtype {found}, expected F32, F16 or BF16")]
    TensorDtype {
        file: String,
        name: String,
        found: String,
    },

    #[error("unsupported weights location `{0}`: expected hf://ORG/REPO[/FILE][@REVISION], file://PATH, a local path, s3://, gs://, az:// or memory:// URL")]
    UnsupportedUrl(String),

    #[error("download of {url} failed: {reason}")]
    Download { url: String, reason: String },

    #[error("{what}: sha256 {found} does not match the expected {expected}")]
    Checksum {
        what: String,
        expected: String,
        found: String,
    },

    #[error("object store {url}: {source}")]
    ObjectStore {
        url: String,
        #[source]
        source: object_store::Error,
    },

    #[error("{file}: {reason}")]
    Reference { file: String, reason: String },

    #[error("invalid configuration: {0}")]
    Config(String),

    /// A job file, recipe or `--set` that cannot run: `file` is the file (or `--set k=v`)
    /// that set the value, `key` its dotted path (`train.lr`).
    #[error(
        "{file}{}: {}{message}",
        .line.map(|l| format!(" line {l}")).unwrap_or_default(),
        .key.as_deref().map(|k| format!("{k}: ")).unwrap_or_default()
    )]
    Job {
        file: String,
        line: Option<usize>,
        key: Option<String>,
        message: String,
    },

    #[error("{url}: field `{field}`: {reason}")]
    ShardIndex {
        url: String,
        field: String,
        reason: String,
    },

    #[error("shard {shard}: {reason}")]
    Shard { shard: String, reason: String },

    #[error("shard {shard}, sample `{key}`: {reason}")]
    ShardSample {
        shard: String,
        key: String,
        reason: String,
    },

    #[error("{file}: {reason}")]
    Dataset { file: String, reason: String },

    #[error("{file}: MD5 {found} does not match the expected {expected}")]
    Md5 {
        file: String,
        expected: String,
        found: String,
    },

    /// A TensorBoard value or event file that cannot be written or read: `what` names the tag
    /// or file (and offset), `reason` what was expected.
    #[error("TensorBoard {what}: {reason}")]
    TensorBoard { what: String, reason: String },

    /// The training data stream: `what` names the option, start position, index or stage.
    #[error("data stream, {what}: {reason}")]
    Stream { what: String, reason: String },

    /// A checkpoint (`<url>/step-NNNNNNNNN`) that is not committed, has a damaged record, or
    /// cannot be found.
    #[error("checkpoint {checkpoint}: {reason}")]
    Checkpoint { checkpoint: String, reason: String },

    /// One file of a checkpoint: missing, of the wrong size or checksum, or a bad name.
    #[error("checkpoint {checkpoint}: file `{file}` {problem}")]
    CheckpointFile {
        checkpoint: String,
        file: String,
        problem: String,
    },

    /// A store operation on a checkpoint that kept failing (or failed for good).
    #[error("checkpoint {checkpoint}: {action} failed after {attempts} attempt(s): {source}")]
    CheckpointStorage {
        checkpoint: String,
        action: String,
        attempts: u32,
        #[source]
        source: object_store::Error,
    },

    /// Feature statistics (FID) that cannot be used: `what` names the file and tensor, or the
    /// statistics compared; `reason` what was expected.
    #[error("FID statistics {what}: {reason}")]
    FidStats { what: String, reason: String },

    /// A statistics file made for something else: its metadata entry `key` is not the value
    /// the caller expects (another dataset index, another Inception network).
    #[error("{file}: metadata `{key}` is {found}, expected `{expected}`")]
    StatsMetadata {
        file: String,
        key: String,
        expected: String,
        /// The value found, quoted, or `missing`.
        found: String,
    },

    /// The training run itself cannot go on (a non-finite loss, state that does not fit).
    #[error("training: {0}")]
    Training(String),

    /// The ranks of a job cannot work together (different inputs, a rank that did not arrive).
    #[error("distributed: {0}")]
    Distributed(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Writes `message` and a newline to stderr in one write. Rust's stderr is unbuffered and
/// `eprintln!` writes each formatted piece apart, so under mpirun a rank that stops (and the
/// `MPI_ABORT` that follows) could cut into another rank's message mid-line; every last word
/// of a failing rank goes through here.
pub fn eprint_whole_line(message: &str) {
    let line = format!("{message}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
}
