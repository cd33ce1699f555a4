//! The writer thread: every ready queued since the last commit goes into
//! one LMDB transaction with one fsync (group commit), in ready order.

use std::sync::Arc;

use ballot_core::Ready;
use tokio::sync::mpsc;

use super::Health;
use crate::metrics::Metrics;
use crate::storage::Storage;

/// The writer thread: group commits in ready order.
pub(super) fn writer(
    health: Arc<Health>,
    storage: Storage,
    readies: std::sync::mpsc::Receiver<Ready>,
    durable: mpsc::Sender<Result<u64, String>>,
    metrics: Arc<Metrics>,
) {
    while let Ok(first) = readies.recv() {
        let mut group = vec![first];
        while let Ok(more) = readies.try_recv() {
            group.push(more);
        }
        let last = group.last().map(|r| r.id).expect("non-empty group");
        let writes = group.iter().map(|r| r.persist.len()).sum::<usize>();
        let _commit =
            tracing::debug_span!("group_commit", readies = group.len(), writes, last).entered();
        if writes > 0 {
            match storage.commit(group.iter().flat_map(|r| r.persist.iter())) {
                Ok(stats) => {
                    metrics.fsync_seconds.observe(stats.elapsed.as_secs_f64());
                    metrics.group_commit_writes.observe(stats.writes as f64);
                    metrics.group_commit_readies.observe(group.len() as f64);
                }
                Err(e) => {
                    // Record the reason first: the core may notice the
                    // writer is gone before it reads this message.
                    let reason = format!("storage write failed: {e}");
                    health.stop(reason.clone());
                    let _ = durable.blocking_send(Err(reason));
                    return;
                }
            }
        }
        if durable.blocking_send(Ok(last)).is_err() {
            return;
        }
    }
}
