//! What a training run shows while it runs: TensorBoard event files written directly (TFRecord
//! framing of hand-declared protobuf messages, to a local dir or an object store), sample grids,
//! and console progress (a bar on a terminal, log lines otherwise).

mod grid;
mod png_image;
mod progress;
pub mod proto;
pub mod record;
pub mod tensorboard;

pub use grid::image_grid;
pub use png_image::encode_png;
pub use progress::{format_stats, Progress, ProgressMode, StepStats};
pub use record::{frame_record, masked_crc32c, read_records};
pub use tensorboard::{EventWriter, EventWriterOptions, HParamValue};
