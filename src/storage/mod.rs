//! Where bytes come from and go to, in one vocabulary: a [`Location`] is a local path or a
//! storage URL (`file://`, `s3://`, `gs://`, `az://`, `memory://`) parsed once into an
//! `object_store` store and path, with blocking get/put/delete/list on it; pretrained weights
//! are resolved from local paths, the Hugging Face Hub or object stores into a verified local
//! cache.
//!
//! Invariants: this module holds the crate's only tokio runtime ([`block_on`]) and its only
//! test of which locations are URLs and which schemes are supported ([`scheme_of`],
//! [`STORE_SCHEMES`]); the rest of the crate reaches stores through [`Location`].

mod location;
mod runtime;
mod scheme;
pub mod weights;

pub use location::{exists, object_store_for, put_bytes, Listing, Location};
pub use runtime::block_on;
pub use scheme::{location_url, scheme_of, scheme_problem, STORE_SCHEMES};
pub use weights::{cache_dir, resolve_weights, weights_scheme_problem};
