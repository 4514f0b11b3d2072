//! Ranks working together: who this process is ([`World`]), the collectives between ranks
//! ([`Collective`]: MPI on CPUs, NCCL on GPUs), averaging gradients in DDP-style buckets, and
//! `ditrun launch` (one rank per GPU, supervision, restarts), and the signals that ask a job to
//! stop.

pub mod collective;
pub mod flight_recorder;
pub mod gradients;
pub mod launch;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod signals;
pub mod world;

use std::time::Duration;

pub use collective::{ensure_same_on_all_ranks, Collective, DeviceAllReduce, SingleProcess};
pub use gradients::{average_gradients, parameter_digest, reduce_bucket};
pub use world::{World, WorldSource};

use crate::error::{Error, Result};

/// The collective for `world`: nothing to connect for one process, MPI between CPU ranks,
/// NCCL (bootstrapped over MPI) between GPU ranks, each on GPU `gpu_ordinal`. A collective
/// that does not complete within `timeout` ends the job, naming the rank(s) that did not arrive.
///
/// GPU ranks started by an MPI launcher use NCCL even when there is only one (`mpirun -np 1`:
/// the smoke test of the NCCL path on a one-GPU machine).
pub fn connect(
    world: &World,
    timeout: Duration,
    gpu_ordinal: Option<usize>,
) -> Result<Box<dyn Collective>> {
    #[cfg(feature = "cuda")]
    if let (Some(ordinal), WorldSource::OpenMpi | WorldSource::Pmi) = (gpu_ordinal, world.source) {
        let host = connect_mpi(world, timeout)?;
        return Ok(Box::new(nccl::NcclCollective::init(host, ordinal)?));
    }
    let _ = gpu_ordinal;
    if !world.is_distributed() {
        return Ok(Box::new(SingleProcess));
    }
    connect_mpi(world, timeout)
}

/// NCCL on one process, without MPI: the smoke test of the NCCL path on a one-GPU machine
/// (`ditrun bench --backend cuda --allreduce`).
#[cfg(feature = "cuda")]
pub fn nccl_single_process(ordinal: usize) -> Result<Box<dyn Collective>> {
    Ok(Box::new(nccl::NcclCollective::init(
        Box::new(SingleProcess),
        ordinal,
    )?))
}

#[cfg(feature = "mpi")]
fn connect_mpi(world: &World, timeout: Duration) -> Result<Box<dyn Collective>> {
    let collective = mpi::MpiCollective::init(timeout)?;
    if collective.world_size() != world.world_size || collective.rank() != world.rank {
        return Err(Error::Distributed(format!(
            "the environment ({:?} variables) says rank {} of {}, but MPI sees rank {} of {}: ditrun's \
             ranks talk over MPI, so start them with `mpirun -np N ditrun ...` or `ditrun launch`",
            world.source,
            world.rank,
            world.world_size,
            collective.rank(),
            collective.world_size()
        )));
    }
    Ok(Box::new(collective))
}

#[cfg(not(feature = "mpi"))]
fn connect_mpi(world: &World, _: Duration) -> Result<Box<dyn Collective>> {
    Err(Error::Distributed(format!(
        "world size {} (from {:?} variables), but this ditrun was built without the `mpi` feature",
        world.world_size, world.source
    )))
}
