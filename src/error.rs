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
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
