//! The last collectives a rank made, kept so that a job that times out can say from its logs
//! alone which rank is stuck where (what PyTorch's NCCL flight recorder does).
//!
//! Invariants:
//! - Every collective is recorded when it starts (sequence number, kind, what it carries and
//!   how many bytes, wall-clock start) and marked when it completes; only the last
//!   [`CAPACITY`] are kept, so memory stays constant over a run.
//! - A rank dumps its record when its own collective times out, and when a stop signal
//!   reaches it while it waits inside one (mpirun's SIGTERM after another rank aborted): every
//!   rank that can still print does, and the stuck one is the rank whose last sequence number
//!   is behind the others'.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Collectives kept per rank.
pub const CAPACITY: usize = 16;

#[derive(Clone, Debug, PartialEq)]
pub struct CollectiveRecord {
    pub sequence: u64,
    pub kind: &'static str,
    pub what: String,
    pub bytes: usize,
    /// Seconds since the Unix epoch: comparable across ranks' logs.
    pub started_unix: f64,
    started: Instant,
    /// Seconds it took; `None` while in flight.
    pub secs: Option<f64>,
}

#[derive(Default)]
pub struct FlightRecorder {
    records: RefCell<VecDeque<CollectiveRecord>>,
}

impl FlightRecorder {
    pub fn started(&self, sequence: u64, kind: &'static str, what: &str, bytes: usize) {
        let mut records = self.records.borrow_mut();
        if records.len() == CAPACITY {
            records.pop_front();
        }
        let started_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64());
        records.push_back(CollectiveRecord {
            sequence,
            kind,
            what: what.to_string(),
            bytes,
            started_unix,
            started: Instant::now(),
            secs: None,
        });
    }

    pub fn completed(&self, sequence: u64) {
        if let Some(record) = self
            .records
            .borrow_mut()
            .iter_mut()
            .rev()
            .find(|record| record.sequence == sequence)
        {
            record.secs = Some(record.started.elapsed().as_secs_f64());
        }
    }

    pub fn records(&self) -> Vec<CollectiveRecord> {
        self.records.borrow().iter().cloned().collect()
    }

    /// The record as log lines, oldest first, headed by `rank` and `why`.
    pub fn dump(&self, rank: usize, why: &str) -> String {
        let mut out = format!("rank {rank}: last collectives ({why}), oldest first:");
        for record in self.records.borrow().iter() {
            let state = match record.secs {
                Some(secs) => format!("done in {secs:.3} s"),
                None => format!(
                    "IN FLIGHT for {:.1} s",
                    record.started.elapsed().as_secs_f64()
                ),
            };
            out.push_str(&format!(
                "\n  rank {rank} #{} {} of {} bytes ({}), started at unix {:.3}, {state}",
                record.sequence, record.kind, record.bytes, record.what, record.started_unix
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_collectives_and_marks_the_one_in_flight() {
        let recorder = FlightRecorder::default();
        for sequence in 1..=(CAPACITY as u64 + 3) {
            recorder.started(sequence, "all-reduce", "gradient bucket", 4096);
            recorder.completed(sequence);
        }
        recorder.started(CAPACITY as u64 + 4, "all-gather", "stop requests", 2);
        let records = recorder.records();
        assert_eq!(records.len(), CAPACITY);
        assert_eq!(records[0].sequence, 5, "the oldest were dropped");
        assert!(records[..CAPACITY - 1].iter().all(|r| r.secs.is_some()));
        assert_eq!(records[CAPACITY - 1].secs, None);
        let dump = recorder.dump(1, "timed out");
        assert!(dump.starts_with("rank 1: last collectives (timed out)"));
        assert!(dump.contains(&format!(
            "rank 1 #{} all-gather of 2 bytes (stop requests)",
            CAPACITY + 4
        )));
        assert!(dump.contains("IN FLIGHT"), "{dump}");
    }
}
