//! Who this process is in the job: rank, local rank and world size, read from whichever
//! launcher started it (OpenMPI's mpirun, MPICH/Intel MPI's PMI, or torchrun-style variables
//! that Kubernetes operators and `ditrun launch` set), and the GPU it binds to.

use std::collections::HashMap;

use crate::error::{Error, Result};

/// Which launcher's variables described the world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorldSource {
    /// No launcher variables: one process.
    Single,
    OpenMpi,
    /// MPICH, Intel MPI, Hydra (`PMI_RANK`, `PMI_SIZE`).
    Pmi,
    /// `RANK`, `WORLD_SIZE` (torchrun, Kubeflow's PyTorchJob, `ditrun launch`).
    Torchrun,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct World {
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes of this node: picks the GPU.
    pub local_rank: usize,
    pub local_world_size: usize,
    pub source: WorldSource,
    /// torchrun's rendezvous address, when set (logged; MPI does its own wiring).
    pub master: Option<String>,
}

impl World {
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            source: WorldSource::Single,
            master: None,
        }
    }

    /// The world described by this process's environment.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(&std::env::vars().collect())
    }

    /// The world described by `vars`. MPI's own variables win over torchrun's, because a
    /// Kubernetes pod may carry stale `RANK`/`WORLD_SIZE` while mpirun starts the ranks.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self> {
        let number = |name: &str| -> Result<Option<usize>> {
            match vars.get(name) {
                None => Ok(None),
                Some(value) => value.trim().parse::<usize>().map(Some).map_err(|_| {
                    Error::Config(format!(
                        "environment variable {name}={value:?} is not a non-negative integer"
                    ))
                }),
            }
        };
        let master = match (vars.get("MASTER_ADDR"), vars.get("MASTER_PORT")) {
            (Some(addr), Some(port)) => Some(format!("{addr}:{port}")),
            (Some(addr), None) => Some(addr.clone()),
            _ => None,
        };
        // (source, rank, size, local rank, local size): the first launcher whose rank and
        // size are both set describes the world.
        let launchers = [
            (
                WorldSource::OpenMpi,
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE",
            ),
            (
                WorldSource::Pmi,
                "PMI_RANK",
                "PMI_SIZE",
                "MPI_LOCALRANKID",
                "MPI_LOCALNRANKS",
            ),
            (
                WorldSource::Torchrun,
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "LOCAL_WORLD_SIZE",
            ),
        ];
        let mut world = World::single();
        for (source, rank, size, local_rank, local_size) in launchers {
            if let (Some(rank), Some(size)) = (number(rank)?, number(size)?) {
                world = World {
                    rank,
                    world_size: size,
                    local_rank: number(local_rank)?.unwrap_or(0),
                    local_world_size: number(local_size)?.unwrap_or(size),
                    source,
                    master,
                };
                break;
            }
        }
        world.check()?;
        Ok(world)
    }

    fn check(&self) -> Result<()> {
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(Error::Config(format!(
                "rank {} is outside world size {} (from {:?} variables)",
                self.rank, self.world_size, self.source
            )));
        }
        if self.local_world_size == 0 || self.local_rank >= self.local_world_size {
            return Err(Error::Config(format!(
                "local rank {} is outside local world size {} (from {:?} variables)",
                self.local_rank, self.local_world_size, self.source
            )));
        }
        Ok(())
    }

    pub fn is_primary(&self) -> bool {
        self.rank == 0
    }

    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    /// The CUDA ordinal this rank uses: local rank i takes the i-th visible GPU. The CUDA
    /// runtime already renumbers the devices listed in `CUDA_VISIBLE_DEVICES` from 0, so the
    /// ordinal is the local rank; more local ranks than visible GPUs is an error, not sharing.
    pub fn gpu_ordinal(&self, visible_gpus: usize) -> Result<usize> {
        if self.local_rank >= visible_gpus {
            return Err(Error::Config(format!(
                "local rank {} has no GPU of its own: {visible_gpus} visible (CUDA_VISIBLE_DEVICES={}); \
                 start at most one rank per GPU",
                self.local_rank,
                std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "<unset>".into()),
            )));
        }
        Ok(self.local_rank)
    }

    /// CPU threads per rank when the job does not say: the node's cores shared evenly, so
    /// ranks on one node do not oversubscribe it.
    pub fn default_cpu_threads(&self) -> usize {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        (cores / self.local_world_size).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_launcher_is_one_process() {
        assert_eq!(World::from_vars(&vars(&[])).unwrap(), World::single());
    }

    #[test]
    fn openmpi_variables_win_over_torchrun_ones() {
        let world = World::from_vars(&vars(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
        ]))
        .unwrap();
        assert_eq!(
            (
                world.rank,
                world.world_size,
                world.local_rank,
                world.local_world_size
            ),
            (3, 4, 1, 2)
        );
        assert_eq!(world.source, WorldSource::OpenMpi);
    }

    #[test]
    fn pmi_and_torchrun_variables_are_read() {
        let pmi = World::from_vars(&vars(&[
            ("PMI_RANK", "1"),
            ("PMI_SIZE", "2"),
            ("MPI_LOCALRANKID", "1"),
        ]))
        .unwrap();
        assert_eq!(
            (pmi.rank, pmi.world_size, pmi.local_rank, pmi.source),
            (1, 2, 1, WorldSource::Pmi)
        );
        let torchrun = World::from_vars(&vars(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap();
        assert_eq!(
            (torchrun.rank, torchrun.world_size, torchrun.local_rank),
            (5, 8, 1)
        );
        assert_eq!(torchrun.master.as_deref(), Some("10.0.0.1:29500"));
    }

    #[test]
    fn impossible_worlds_are_refused_with_the_variable() {
        let error = World::from_vars(&vars(&[("RANK", "2"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(
            error.to_string().contains("rank 2 is outside world size 2"),
            "{error}"
        );
        let error = World::from_vars(&vars(&[("RANK", "x"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(error.to_string().contains("RANK=\"x\""), "{error}");
    }

    #[test]
    fn a_local_rank_without_its_own_gpu_is_an_error() {
        let world = World::from_vars(&vars(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
        ]))
        .unwrap();
        assert_eq!(world.gpu_ordinal(2).unwrap(), 1);
        assert!(world
            .gpu_ordinal(1)
            .unwrap_err()
            .to_string()
            .contains("no GPU of its own"));
    }
}
