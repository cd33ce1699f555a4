//! The writer thread: every ready queued since the last commit goes into
//! one log record with one fsync (group commit), in ready order.

use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use ballot_core::Ready;
use tokio::sync::mpsc;

use super::Health;
use crate::metrics::Metrics;
use crate::storage::{Storage, StorageError};

/// How often an idle writer looks whether the storage's applier failed.
const FAILURE_CHECK: Duration = Duration::from_millis(200);

/// The writer thread: group commits in ready order.
pub(super) fn writer(
    health: Arc<Health>,
    storage: Storage,
    readies: std::sync::mpsc::Receiver<Ready>,
    durable: mpsc::Sender<Result<u64, String>>,
    metrics: Arc<Metrics>,
) {
    let stop = |e: StorageError| {
        // Record the reason first: the core may notice the writer is gone
        // before it reads this message.
        let reason = format!("storage write failed: {e}");
        health.stop(reason.clone());
        let _ = durable.blocking_send(Err(reason));
    };
    loop {
        let first = match readies.recv_timeout(FAILURE_CHECK) {
            Ok(first) => first,
            Err(RecvTimeoutError::Timeout) => {
                // The applier fails between commits too: an idle replica
                // whose LMDB cannot take what was logged stops answering.
                if let Some(e) = storage.failure() {
                    return stop(e);
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut group = vec![first];
        while let Ok(more) = readies.try_recv() {
            group.push(more);
        }
        let last = group.last().map(|r| r.id).expect("non-empty group");
        let writes = group.iter().map(|r| r.persist.len()).sum::<usize>();
        let _commit =
            tracing::debug_span!("group_commit", readies = group.len(), writes, last).entered();
        if writes > 0 {
            let persist = group
                .iter_mut()
                .flat_map(|r| std::mem::take(&mut r.persist));
            match storage.commit(persist.collect()) {
                Ok(stats) => {
                    metrics.fsync_seconds.observe(stats.elapsed.as_secs_f64());
                    if !stats.waited.is_zero() {
                        metrics.log_wait_seconds.observe(stats.waited.as_secs_f64());
                    }
                    metrics.group_commit_writes.observe(stats.writes as f64);
                    metrics.group_commit_readies.observe(group.len() as f64);
                }
                Err(e) => return stop(e),
            }
        }
        if durable.blocking_send(Ok(last)).is_err() {
            return;
        }
    }
}
