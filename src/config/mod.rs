//! The job spec: typed YAML sections with the seed's defaults, recipes (`configs/`) merged under
//! jobs (`jobs/`), `--set key.path=value` overrides, and checks that name the file, key path and
//! line of anything that cannot run, all before any work starts.

mod keylines;
mod load;
mod spec;
mod text_encoder;

pub use load::{load_job, location_url, QUICKSTART_JOB};
pub use spec::{
    BackendChoice, CheckpointSpec, DataSpec, DatasetKind, DistSpec, EvalSpec, JobSpec, LoggingSpec,
    OnNonFinite, PrepareSpec, SampleSpec, Split, TextEncoderSpec, TrainSpec,
};
