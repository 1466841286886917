//! The node writer: one group commit at a time. As soon as the previous
//! commit returns it takes every batch that became due meanwhile, from
//! every room, and commits them in one transaction. Under load batches fill
//! by themselves; when quiet, each room's alarm bounds the wait.
//!
//! A database failure is retried with capped exponential backoff, forever:
//! the rows stay in order and nothing is dropped. When the database rejects
//! a group (a constraint or a value), each room is committed alone so one
//! room's bad rows never fail the others; the rejected room gets its rows
//! back to reconcile.
//!
//! A room may have several batches queued here at once (a busy room keeps
//! filling batches while one commits). They are committed in the order
//! they were submitted, so a room's rows stay in seq order across batches.
//! Once one of them is rejected, the room's later batches of the same
//! generation are answered [`Outcome::Cancelled`] without being written:
//! their seqs follow the rejected ones, which the room is about to
//! renumber, so writing them would leave a gap.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_protocol::{NodeId, RoomId};
use tokio::sync::{mpsc, oneshot};

use crate::membership::now_ms;
use crate::metrics::METRICS;
use crate::store::{RoomRows, Row, Store, StoreError};

/// Most room batches in one group commit.
const MAX_JOBS_PER_COMMIT: usize = 256;
/// First retry delay after a database failure.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Batches that may wait for the writer. A room has at most
/// `room::MAX_IN_FLIGHT` batches queued; a room that finds the queue full
/// keeps its rows and tries again at its next alarm.
pub const QUEUE: usize = 65_536;

/// What happened to a room's batch.
#[derive(Debug)]
pub enum Outcome {
    /// Committed with `created_at = ts_ms`.
    Committed {
        /// The commit time given to every row.
        ts_ms: i64,
    },
    /// The database refused the rows; the room must reconcile and resubmit.
    Rejected {
        /// The database's reason.
        reason: String,
    },
    /// Nothing was written: another node holds the room's lease now.
    Fenced,
    /// Nothing was written: an earlier batch of the room, of the same
    /// generation, was rejected. The rows go back to the room, which
    /// renumbers them with the rejected ones.
    Cancelled,
}

/// One room's batch, handed to the writer.
#[derive(Debug)]
pub struct FlushJob {
    /// The room.
    pub room: RoomId,
    /// The lease epoch the room holds.
    pub epoch: u64,
    /// Drawn from a process-wide counter by each room actor when it starts
    /// and each time it reconciles a rejected batch: the actor's batches of
    /// the rejected generation or older are cancelled, and a later actor of
    /// the room never starts at a generation an old mark would cancel.
    pub generation: u64,
    /// Its rows, in seq order.
    pub rows: Vec<Row>,
    /// Gets the rows back with the outcome.
    pub done: oneshot::Sender<(Vec<Row>, Outcome)>,
}

/// Submits batches to the writer.
#[derive(Debug, Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<FlushJob>,
}

impl WriterHandle {
    /// Queues a batch without waiting.
    ///
    /// # Errors
    /// Gives the job back when the queue is full or the writer stopped.
    pub fn submit(&self, job: FlushJob) -> Result<(), FlushJob> {
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
        })
    }
}

/// Who commits, and for how long a commit extends the leases it is fenced by.
#[derive(Debug, Clone)]
struct Fence {
    owner: NodeId,
    ttl: Duration,
}

/// Starts the writer for node `owner`; commits extend leases by
/// `lease_ttl`. It ends when every handle is dropped and the queue is empty.
pub fn spawn(
    store: Arc<dyn Store>,
    owner: NodeId,
    lease_ttl: Duration,
) -> (WriterHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let fence = Fence {
        owner,
        ttl: lease_ttl,
    };
    let span = tracing::info_span!("writer", node.id = %fence.owner);
    let task = tokio::spawn(tracing::Instrument::instrument(run(store, fence, rx), span));
    (WriterHandle { tx }, task)
}

/// Rooms whose batch was rejected, with the (epoch, generation) rejected:
/// the rejected actor's queued batches up to that generation are
/// cancelled. Only the same epoch is compared: another epoch is another
/// actor of the room (one that lost or took the lease), whose batches go
/// to the database and are fenced there by epoch. An entry goes when a
/// newer batch of the room arrives (the actor reconciled, or a newer actor
/// writes). One whose room never writes again stays, a few dozen bytes:
/// rejections are rare (they need a rival writer or a row the database
/// refuses), and dropping an entry early could let a stale batch through.
#[derive(Debug, Default)]
struct Poisoned(HashMap<RoomId, (u64, u64)>);

impl Poisoned {
    /// Whether `job` must be cancelled; forgets the room once a newer
    /// batch shows the rejection is behind it.
    fn cancels(&mut self, job: &FlushJob) -> bool {
        let Some(&(epoch, generation)) = self.0.get(&job.room) else {
            return false;
        };
        if job.epoch == epoch && job.generation <= generation {
            return true;
        }
        if (job.epoch, job.generation) > (epoch, generation) {
            self.0.remove(&job.room);
        }
        false
    }

    fn mark(&mut self, job: &FlushJob) {
        self.0.insert(job.room.clone(), (job.epoch, job.generation));
    }
}

async fn run(store: Arc<dyn Store>, fence: Fence, mut rx: mpsc::Receiver<FlushJob>) {
    let mut jobs = Vec::with_capacity(MAX_JOBS_PER_COMMIT);
    let mut poisoned = Poisoned::default();
    while rx.recv_many(&mut jobs, MAX_JOBS_PER_COMMIT).await > 0 {
        // Rooms whose alarms fell on the same boundary are ready at the
        // same instant; let them hand in their batches before committing,
        // or the first would commit alone and the rest wait behind it.
        tokio::task::yield_now().await;
        while jobs.len() < MAX_JOBS_PER_COMMIT {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        cancel_poisoned(&mut poisoned, &mut jobs);
        if !jobs.is_empty() {
            commit_group(&*store, &fence, &mut jobs, &mut poisoned).await;
        }
    }
}

/// Answers [`Outcome::Cancelled`] to the jobs that follow a rejection of
/// their room, and keeps the rest in order.
fn cancel_poisoned(poisoned: &mut Poisoned, jobs: &mut Vec<FlushJob>) {
    // In place: every group passes here, and almost never is one cancelled.
    for job in jobs.extract_if(.., |job| poisoned.cancels(job)) {
        METRICS.flush_cancelled.inc();
        answer(job, Outcome::Cancelled);
    }
}

/// Commits `jobs` together, retrying while the database is unavailable;
/// isolates rooms when it rejects the group. Answers every job.
async fn commit_group(
    store: &dyn Store,
    fence: &Fence,
    jobs: &mut Vec<FlushJob>,
    poisoned: &mut Poisoned,
) {
    match commit_retrying(store, fence, jobs).await {
        Ok((ts_ms, fenced)) => {
            for (i, job) in jobs.drain(..).enumerate() {
                if fenced.contains(&i) {
                    METRICS.flush_fenced.inc();
                    tracing::warn!(room = %job.room, epoch = job.epoch, "batch fenced: another node owns the room now");
                    answer(job, Outcome::Fenced);
                } else {
                    answer(job, Outcome::Committed { ts_ms });
                }
            }
        }
        Err(reason) if jobs.len() == 1 => {
            METRICS.flush_rejected.inc();
            tracing::warn!(room = %jobs[0].room, %reason, "database rejected a room batch");
            poisoned.mark(&jobs[0]);
            for job in jobs.drain(..) {
                answer(
                    job,
                    Outcome::Rejected {
                        reason: reason.clone(),
                    },
                );
            }
        }
        Err(_) => {
            // Find the bad room(s): commit each batch on its own, in order,
            // so a room's batches after its rejected one are cancelled.
            for job in std::mem::take(jobs) {
                let mut one = vec![job];
                cancel_poisoned(poisoned, &mut one);
                if !one.is_empty() {
                    Box::pin(commit_group(store, fence, &mut one, poisoned)).await;
                }
            }
        }
    }
}

/// One group commit, retried with capped exponential backoff until the
/// database takes or rejects it.
async fn commit_retrying(
    store: &dyn Store,
    fence: &Fence,
    jobs: &[FlushJob],
) -> Result<(i64, Vec<usize>), String> {
    let mut backoff = BACKOFF_MIN;
    loop {
        let batches: Vec<RoomRows<'_>> = jobs
            .iter()
            .map(|j| RoomRows {
                room: &j.room,
                epoch: j.epoch,
                rows: &j.rows,
            })
            .collect();
        let rows: usize = jobs.iter().map(|j| j.rows.len()).sum();
        let ts_ms = now_ms();
        let started = Instant::now();
        match store.commit(&fence.owner, &batches, fence.ttl, ts_ms).await {
            Ok(fenced) => {
                METRICS
                    .flush_seconds
                    .observe(started.elapsed().as_secs_f64());
                METRICS.flush_batch_rows.observe(rows as f64);
                let fenced_rows: usize = fenced.iter().map(|&i| jobs[i].rows.len()).sum();
                METRICS.rows_persisted.inc_by((rows - fenced_rows) as u64);
                METRICS.flush_failing.set(0);
                return Ok((ts_ms, fenced));
            }
            Err(StoreError::Rejected(reason)) => {
                // The database answered: it is reachable, the rows are not.
                METRICS.flush_failing.set(0);
                return Err(reason);
            }
            Err(StoreError::Unavailable(reason)) => {
                METRICS.flush_retries.inc();
                METRICS.flush_failing.inc();
                tracing::warn!(%reason, rows, retry_in_ms = backoff.as_millis() as u64, "commit failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

fn answer(job: FlushJob, outcome: Outcome) {
    // The room may have stopped (process shutting down); then nobody waits.
    let _ = job.done.send((job.rows, outcome));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(epoch: u64, generation: u64) -> FlushJob {
        let (done, _) = oneshot::channel();
        FlushJob {
            room: RoomId::new("r").unwrap(),
            epoch,
            generation,
            rows: Vec::new(),
            done,
        }
    }

    #[test]
    fn a_rejection_cancels_its_actors_batches_up_to_its_generation() {
        let mut p = Poisoned::default();
        p.mark(&job(3, 10));
        assert!(p.cancels(&job(3, 9)));
        assert!(p.cancels(&job(3, 10)));
        // The reconciled actor's next generation clears the mark.
        assert!(!p.cancels(&job(3, 11)));
        assert!(!p.cancels(&job(3, 10)), "forgotten once reconciled");
    }

    #[test]
    fn other_actors_of_the_room_are_left_to_the_database_fence() {
        let mut p = Poisoned::default();
        p.mark(&job(4, 20));
        // An older actor (it lost the lease): not cancelled, its batch is
        // fenced by epoch in the store; the newer actor's mark stays.
        assert!(!p.cancels(&job(3, 25)));
        assert!(p.cancels(&job(4, 20)));
        // A newer actor: passes and clears the old actor's mark, whose
        // remaining batches the store fences.
        assert!(!p.cancels(&job(5, 1)));
        assert!(!p.cancels(&job(4, 20)));
    }
}
