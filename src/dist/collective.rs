//! What data-parallel training needs from the ranks of a job, whatever carries it: a mean of
//! gradients, one rank's bytes on every rank, every rank's digest, and a barrier. Every call
//! is collective: all ranks make the same calls in the same order.

use crate::error::{Error, Result};

pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// What carries the data ("single process", "MPI", ...), for logs.
    fn transport(&self) -> &'static str;

    /// Replaces `values` by their element-wise mean over the ranks; every rank ends up with
    /// the same bits. `what` names the operation in timeout messages.
    fn all_reduce_mean(&self, values: &mut [f32], what: &str) -> Result<()>;

    /// Rank `root`'s `bytes` on every rank (the other ranks' `bytes` are ignored).
    fn broadcast(&self, root: usize, bytes: Vec<u8>, what: &str) -> Result<Vec<u8>>;

    /// Every rank's `mine`, in rank order; `mine` has the same length on every rank.
    fn all_gather(&self, mine: &[u8], what: &str) -> Result<Vec<Vec<u8>>>;

    fn barrier(&self, what: &str) -> Result<()>;

    /// Ends every rank of the job now: a rank that failed calls this so that the others do
    /// not wait for it in their next collective.
    fn abort(&self, code: i32) -> !;

    /// The transport's collectives on GPU memory (NCCL), when it has them.
    fn device(&self) -> Option<&dyn DeviceAllReduce> {
        None
    }
}

/// An all-reduce on device memory, so that GPU gradients never leave the GPU.
pub trait DeviceAllReduce {
    /// Replaces the `len` f32 values at device address `address` by their mean over ranks.
    ///
    /// # Safety
    /// `address` must point at `len` f32 values on this rank's GPU that stay allocated, and
    /// that no other work reads or writes, until this returns.
    unsafe fn all_reduce_mean_device(&self, address: u64, len: usize, what: &str) -> Result<()>;
}

/// The one-process world: every collective is the identity.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn transport(&self) -> &'static str {
        "single process"
    }
    fn all_reduce_mean(&self, _: &mut [f32], _: &str) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: usize, bytes: Vec<u8>, _: &str) -> Result<Vec<u8>> {
        Ok(bytes)
    }
    fn all_gather(&self, mine: &[u8], _: &str) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn barrier(&self, _: &str) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// Refuses to go on unless every rank holds the same `digest` of `what` (a config hash, a
/// dataset index, parameters); the error names the ranks that differ from rank 0.
pub fn ensure_same_on_all_ranks(
    collective: &dyn Collective,
    what: &str,
    digest: &str,
) -> Result<()> {
    let all = collective.all_gather(digest.as_bytes(), what)?;
    let differing: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, other)| other.as_slice() != all[0].as_slice())
        .map(|(rank, other)| format!("rank {rank} has {}", String::from_utf8_lossy(other)))
        .collect();
    if differing.is_empty() {
        return Ok(());
    }
    Err(Error::Distributed(format!(
        "the ranks disagree on the {what}: rank 0 has {}, {}",
        String::from_utf8_lossy(&all[0]),
        differing.join(", ")
    )))
}
