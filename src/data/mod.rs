//! Captioned image datasets (synthetic, CIFAR-10, Fashion-MNIST) and the WebDataset-compatible
//! caption shards they are prepared into: `shards` writes and reads one shard at a time,
//! `stream` orders, partitions and prefetches them for training.
//!
//! Dependencies run one way: `shards` and `split` at the bottom, the dataset readers
//! (`synthetic`, `cifar10`, `fashion_mnist`) on them, `prepare` on the readers, and `stream`
//! on `shards` alone.

pub mod cifar10;
pub mod fashion_mnist;
pub mod prepare;
pub mod shards;
pub mod split;
pub mod stream;
pub mod synthetic;

pub use prepare::{prepare, prepare_with, DatasetKind, PrepareOptions};
pub use shards::{read_index, read_shard, Sample, ShardEntry, ShardIndex, ShardWriter};
pub use split::Split;
pub use synthetic::{synthetic, synthetic_captions};
