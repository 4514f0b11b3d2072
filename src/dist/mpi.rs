//! Collectives over MPI (OpenMPI on Debian; any MPI-3 library): the CPU ranks' gradient
//! all-reduce and the bootstrap channel for NCCL.
//!
//! Every collective is non-blocking underneath and polled against a deadline, so that a rank
//! that never arrives ends the job instead of hanging it. To name the rank(s) that did not
//! arrive, each call also sends its sequence number to every peer on a separate communicator:
//! when the deadline passes, the peers whose number has not come in are the missing ones.
//! Each call is also kept in the rank's flight recorder (`flight_recorder.rs`), dumped on a
//! timeout and when mpirun's SIGTERM reaches a rank waiting inside a collective.

use std::ffi::c_void;
use std::os::raw::c_int;
use std::time::{Duration, Instant};

use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;

use super::collective::Collective;
use super::flight_recorder::FlightRecorder;
use super::signals;
use crate::error::{Error, Result};

/// MPI counts are C ints: larger buffers travel in pieces of this many elements.
const MAX_COUNT: usize = 1 << 30;
const ARRIVAL_TAG: c_int = 17;
/// How long a rank must have waited inside a collective for a stop signal to dump its record.
const SIGNALLED_WAIT_WORTH_A_DUMP: Duration = Duration::from_secs(1);
/// Exit code of a job ended because a collective timed out.
pub const TIMEOUT_EXIT_CODE: i32 = 3;

pub struct MpiCollective {
    // Field order is drop order: the communicators are freed before MPI is finalised.
    data: SimpleCommunicator,
    arrivals: SimpleCommunicator,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    sequence: std::cell::Cell<u64>,
    recorder: FlightRecorder,
    _universe: mpi::environment::Universe,
}

impl MpiCollective {
    /// Initialises MPI (once per process); the collective finalises it when dropped.
    pub fn init(timeout: Duration) -> Result<Self> {
        let (universe, _) =
            mpi::initialize_with_threading(Threading::Funneled).ok_or_else(|| {
                Error::Distributed("MPI is already initialised in this process".into())
            })?;
        let world = universe.world();
        let data = world.duplicate();
        let arrivals = world.duplicate();
        Ok(Self {
            rank: world.rank() as usize,
            world_size: world.size() as usize,
            data,
            arrivals,
            timeout,
            sequence: std::cell::Cell::new(0),
            recorder: FlightRecorder::default(),
            _universe: universe,
        })
    }

    /// Runs one collective: posts the arrival messages, lets `post` start the operation's
    /// requests, then polls everything until done or the deadline.
    ///
    /// `post` hands MPI pointers into buffers the caller borrows for the whole call; they
    /// stay valid because this returns only once every request completed (or the process
    /// aborted).
    fn round(
        &self,
        (kind, bytes): (&'static str, usize),
        what: &str,
        post: impl FnOnce(ffi::MPI_Comm, &mut Vec<ffi::MPI_Request>) -> c_int,
    ) -> Result<()> {
        let sequence = self.sequence.get() + 1;
        self.sequence.set(sequence);
        self.recorder.started(sequence, kind, what, bytes);
        let mut arrivals = Arrivals::post(self, sequence, what)?;
        let mut operation: Vec<ffi::MPI_Request> = Vec::new();
        check(post(self.data.as_raw(), &mut operation), what)?;
        self.wait_or_abort(what, &mut arrivals, &mut operation);
        self.recorder.completed(sequence);
        for (&peer, &theirs) in arrivals.peers.iter().zip(arrivals.incoming.iter()) {
            if theirs != sequence {
                return Err(Error::Distributed(format!(
                    "{what}: rank {peer} is at collective #{theirs} while rank {} is at #{sequence}: the ranks \
                     are running different steps",
                    self.rank
                )));
            }
        }
        Ok(())
    }

    /// Polls the arrivals and `operation` until all complete; past the deadline, names the
    /// ranks that did not arrive and ends the job.
    fn wait_or_abort(
        &self,
        what: &str,
        arrivals: &mut Arrivals,
        operation: &mut [ffi::MPI_Request],
    ) {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let mut polls = 0u32;
        let mut dumped = false;
        loop {
            let arrived_all = test_all(&mut arrivals.receives);
            let sent_all = test_all(&mut arrivals.sends);
            if arrived_all && sent_all && test_all(operation) {
                return;
            }
            if Instant::now() >= deadline {
                let message = self.timeout_message(what, arrivals);
                tracing::error!("{message}");
                crate::error::eprint_whole_line(&format!("error: distributed: {message}"));
                crate::error::eprint_whole_line(&self.recorder.dump(self.rank, "timed out"));
                self.abort(TIMEOUT_EXIT_CODE);
            }
            // Another rank's timeout ends the job through mpirun's SIGTERM, a second before
            // its SIGKILL: the time to say where this rank was.
            if !dumped
                && started.elapsed() > SIGNALLED_WAIT_WORTH_A_DUMP
                && signals::received().is_some()
            {
                dumped = true;
                crate::error::eprint_whole_line(
                    &self
                        .recorder
                        .dump(self.rank, "asked to stop while waiting in a collective"),
                );
            }
            // Spin briefly (collectives that are about to finish), then sleep so that a rank
            // waiting for a slower one leaves the cores to it.
            polls += 1;
            if polls < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    fn timeout_message(&self, what: &str, arrivals: &Arrivals) -> String {
        let sequence = arrivals.outgoing[0];
        let missing: Vec<String> = arrivals
            .peers
            .iter()
            .zip(&arrivals.receives)
            .filter(|(_, request)| !is_null(**request))
            .map(|(peer, _)| peer.to_string())
            .collect();
        if missing.is_empty() {
            // Everyone sent its arrival, so a peer stopped or died inside the transfer; which
            // one is not observable from here.
            let peers: Vec<String> = arrivals.peers.iter().map(usize::to_string).collect();
            format!(
                "{what} (collective #{sequence}) did not complete within {:?} on rank {}: every rank \
                 arrived, but the transfer with rank(s) {} stalled (one of them stopped or died \
                 mid-transfer); ending the job",
                self.timeout,
                self.rank,
                peers.join(", ")
            )
        } else {
            format!(
                "{what} (collective #{sequence}) did not complete within {:?} on rank {}: rank(s) {} \
                 did not arrive; ending the job",
                self.timeout,
                self.rank,
                missing.join(", ")
            )
        }
    }
}

/// The arrival messages of one collective: every rank sends its sequence number to every
/// other rank and receives theirs. The buffers are on the heap, so the pointers MPI holds stay
/// valid when this moves.
struct Arrivals {
    peers: Vec<usize>,
    outgoing: Box<[u64; 1]>,
    incoming: Vec<u64>,
    receives: Vec<ffi::MPI_Request>,
    sends: Vec<ffi::MPI_Request>,
}

impl Arrivals {
    fn post(collective: &MpiCollective, sequence: u64, what: &str) -> Result<Self> {
        let peers: Vec<usize> = (0..collective.world_size)
            .filter(|&r| r != collective.rank)
            .collect();
        let mut arrivals = Self {
            outgoing: Box::new([sequence]),
            incoming: vec![0u64; peers.len()],
            receives: vec![null_request(); peers.len()],
            sends: vec![null_request(); peers.len()],
            peers,
        };
        let communicator = collective.arrivals.as_raw();
        for slot in 0..arrivals.peers.len() {
            let peer = arrivals.peers[slot] as c_int;
            // SAFETY: the buffers live on the heap as long as `arrivals`, which the collective
            // keeps until every request completed.
            unsafe {
                let incoming = arrivals.incoming[slot..].as_mut_ptr() as *mut c_void;
                let receive = &mut arrivals.receives[slot];
                check(
                    ffi::MPI_Irecv(
                        incoming,
                        1,
                        ffi::RSMPI_UINT64_T,
                        peer,
                        ARRIVAL_TAG,
                        communicator,
                        receive,
                    ),
                    what,
                )?;
                let outgoing = arrivals.outgoing.as_ptr() as *const c_void;
                let send = &mut arrivals.sends[slot];
                check(
                    ffi::MPI_Isend(
                        outgoing,
                        1,
                        ffi::RSMPI_UINT64_T,
                        peer,
                        ARRIVAL_TAG,
                        communicator,
                        send,
                    ),
                    what,
                )?;
            }
        }
        Ok(arrivals)
    }
}

/// Starts one non-blocking MPI call, which writes its request through the pointer it gets,
/// and keeps the request for [`MpiCollective::round`] to poll; returns the call's error code.
fn start(
    requests: &mut Vec<ffi::MPI_Request>,
    call: impl FnOnce(*mut ffi::MPI_Request) -> c_int,
) -> c_int {
    let mut request = null_request();
    let code = call(&mut request);
    requests.push(request);
    code
}

fn null_request() -> ffi::MPI_Request {
    unsafe { ffi::RSMPI_REQUEST_NULL }
}

fn is_null(request: ffi::MPI_Request) -> bool {
    request == null_request()
}

/// Tests every pending request (MPI_Test nulls the finished ones); true when none is left.
fn test_all(requests: &mut [ffi::MPI_Request]) -> bool {
    let mut all = true;
    for request in requests.iter_mut().filter(|r| !is_null(**r)) {
        let mut flag: c_int = 0;
        unsafe {
            ffi::MPI_Test(request, &mut flag, ffi::RSMPI_STATUS_IGNORE);
        }
        all &= flag != 0;
    }
    all
}

fn check(code: c_int, what: &str) -> Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(Error::Distributed(format!(
            "{what}: MPI call failed with error code {code}"
        )))
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn transport(&self) -> &'static str {
        "MPI"
    }

    fn all_reduce_mean(&self, values: &mut [f32], what: &str) -> Result<()> {
        let send = values.to_vec();
        self.round(
            ("all-reduce", 4 * values.len()),
            what,
            |comm, requests| unsafe {
                for (send, receive) in send.chunks(MAX_COUNT).zip(values.chunks_mut(MAX_COUNT)) {
                    let code = start(requests, |request| {
                        ffi::MPI_Iallreduce(
                            send.as_ptr() as *const c_void,
                            receive.as_mut_ptr() as *mut c_void,
                            send.len() as c_int,
                            ffi::RSMPI_FLOAT,
                            ffi::RSMPI_SUM,
                            comm,
                            request,
                        )
                    });
                    if code != 0 {
                        return code;
                    }
                }
                0
            },
        )?;
        let scale = 1.0 / self.world_size as f32;
        values.iter_mut().for_each(|v| *v *= scale);
        Ok(())
    }

    fn broadcast(&self, root: usize, mut bytes: Vec<u8>, what: &str) -> Result<Vec<u8>> {
        let mut length = [bytes.len() as u64];
        self.round(("broadcast (length)", 8), what, |comm, requests| unsafe {
            start(requests, |request| {
                ffi::MPI_Ibcast(
                    length.as_mut_ptr() as *mut c_void,
                    1,
                    ffi::RSMPI_UINT64_T,
                    root as c_int,
                    comm,
                    request,
                )
            })
        })?;
        bytes.resize(length[0] as usize, 0);
        self.round(("broadcast", bytes.len()), what, |comm, requests| unsafe {
            for piece in bytes.chunks_mut(MAX_COUNT) {
                let code = start(requests, |request| {
                    let count = piece.len() as c_int;
                    ffi::MPI_Ibcast(
                        piece.as_mut_ptr() as *mut c_void,
                        count,
                        ffi::RSMPI_UINT8_T,
                        root as c_int,
                        comm,
                        request,
                    )
                });
                if code != 0 {
                    return code;
                }
            }
            0
        })?;
        Ok(bytes)
    }

    fn all_gather(&self, mine: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
        let mut all = vec![0u8; mine.len() * self.world_size];
        self.round(("all-gather", all.len()), what, |comm, requests| unsafe {
            start(requests, |request| {
                let count = mine.len() as c_int;
                let (send, receive) = (
                    mine.as_ptr() as *const c_void,
                    all.as_mut_ptr() as *mut c_void,
                );
                ffi::MPI_Iallgather(
                    send,
                    count,
                    ffi::RSMPI_UINT8_T,
                    receive,
                    count,
                    ffi::RSMPI_UINT8_T,
                    comm,
                    request,
                )
            })
        })?;
        Ok(all.chunks(mine.len().max(1)).map(<[u8]>::to_vec).collect())
    }

    fn barrier(&self, what: &str) -> Result<()> {
        self.round(("barrier", 0), what, |comm, requests| unsafe {
            start(requests, |request| ffi::MPI_Ibarrier(comm, request))
        })
    }

    fn abort(&self, code: i32) -> ! {
        unsafe {
            ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, code);
        }
        // MPI_Abort does not return; should an MPI library return anyway, still end this rank.
        std::process::exit(code)
    }
}
