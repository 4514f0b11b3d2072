//! Where bytes come from and go to: storage URLs (`file://`, `s3://`, `gs://`, `az://`,
//! `memory://`) mapped to `object_store` stores, and pretrained weights resolved from local
//! paths, the Hugging Face Hub or object stores into a verified local cache.

pub mod url;
pub mod weights;

pub use url::{block_on, exists, object_store_for, put_bytes};
pub use weights::{cache_dir, resolve_weights};
