//! Which keys exist under a prefix: the union of the keys a classic quorum
//! of voters holds protocol state for, every answer given in the epoch
//! this replica's protocol runs.
//!
//! Why that misses no key written before the listing began: a write is
//! acknowledged once a quorum of its epoch holds its acceptance durably,
//! and a linearizable read counts a classic quorum of one epoch (the stamp
//! on every message, section 11 of the design) and must find that
//! acceptance or the value learned from it, or it would return a stale
//! absence. A listing counts the same kind of quorum, fenced the same way
//! (a voter answers only while the epoch it has published, the one its
//! protocol runs with every earlier vote durable, is the asker's), so
//! some answer holds state for every such key. Values are then read one key
//! at a time, linearizably, by the caller.

use std::sync::Arc;

use tokio::task::JoinSet;

use super::answers::{Answer, What};
use super::Membership;

/// One page of a listing.
#[derive(Debug, Default, PartialEq)]
pub struct KeyPage {
    /// In key order, at most the limit asked for.
    pub keys: Vec<Vec<u8>>,
    /// Where the next page starts (exclusive), if there may be more keys.
    pub next: Option<Vec<u8>>,
}

impl Membership {
    /// Up to `limit` keys under `prefix` after `after` that a classic
    /// quorum of this epoch's voters hold state for.
    pub async fn list_keys(
        self: &Arc<Self>,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<KeyPage, String> {
        let epoch = self.transport.epoch();
        let record = self
            .record()
            .or_else(|| self.bootstrap.clone())
            .ok_or("this replica has no membership record yet")?;
        if record.epoch != epoch {
            return Err(format!(
                "the membership is moving from epoch {epoch} to {}: try again",
                record.epoch
            ));
        }
        let voters = record.voters();
        let quorum = voters.len() / 2 + 1;
        let limit = limit.max(1);
        let mut asks = JoinSet::new();
        for voter in voters {
            let me = self.clone();
            let (prefix, after) = (prefix.to_vec(), after.map(<[u8]>::to_vec));
            asks.spawn(async move {
                if voter == me.me {
                    let keys = me
                        .storage
                        .state_keys_in(&prefix, after.as_deref(), limit)
                        .map_err(|e| e.to_string())?;
                    return Ok((keys.len() < limit, keys));
                }
                let what = What::Keys {
                    after,
                    limit: limit as u32,
                    prefix: Some(prefix.clone()),
                    epoch: Some(epoch),
                };
                match me.ask(voter, what).await? {
                    // Only an answer that says it applied the prefix and
                    // the epoch counts: an earlier build ignores both and
                    // lists every key from the start, unfenced.
                    Answer::Keys {
                        keys,
                        last,
                        prefix: Some(p),
                        epoch: Some(e),
                    } if p == prefix && e == epoch => {
                        if keys
                            .iter()
                            .any(|k| !k.starts_with(&prefix) || k.first() == Some(&0))
                        {
                            return Err(format!("replica {voter} listed keys outside the prefix"));
                        }
                        Ok((last, keys))
                    }
                    Answer::Keys { .. } => Err(format!(
                        "replica {voter} cannot list a prefix in an epoch (an earlier build)"
                    )),
                    other => Err(format!("replica {voter}: unexpected answer {other:?}")),
                }
            });
        }
        let mut pages = Vec::new();
        let mut errors = Vec::new();
        while let Some(done) = asks.join_next().await {
            match done {
                Ok(Ok(page)) => {
                    pages.push(page);
                    if pages.len() == quorum {
                        break;
                    }
                }
                Ok(Err(e)) => errors.push(e),
                Err(e) => errors.push(e.to_string()),
            }
        }
        asks.abort_all();
        if pages.len() < quorum {
            return Err(format!(
                "{} of {quorum} voters listed their keys: {}",
                pages.len(),
                errors.join("; ")
            ));
        }
        Ok(merge(pages, limit))
    }
}

impl Membership {
    /// Up to `limit` keys under `prefix` after `after` that this replica
    /// holds state for (no quorum: `consistency=local`).
    pub fn list_local_keys(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<KeyPage, String> {
        let limit = limit.max(1);
        let keys = self
            .storage
            .state_keys_in(prefix, after, limit)
            .map_err(|e| e.to_string())?;
        let next = (keys.len() == limit)
            .then(|| keys.last().cloned())
            .flatten();
        Ok(KeyPage { keys, next })
    }
}

/// Merges pages of keys (each in order, `last` when it holds every key
/// its replica has after the start): a key past the end of a page that is
/// not the last may exist on that replica, so the merged page stops at the
/// first such end.
fn merge(pages: Vec<(bool, Vec<Vec<u8>>)>, limit: usize) -> KeyPage {
    let end: Option<Vec<u8>> = pages
        .iter()
        .filter(|(last, keys)| !last && !keys.is_empty())
        .filter_map(|(_, keys)| keys.last().cloned())
        .min();
    let mut keys: Vec<Vec<u8>> = pages.into_iter().flat_map(|(_, keys)| keys).collect();
    keys.sort_unstable();
    keys.dedup();
    if let Some(end) = &end {
        keys.retain(|k| k <= end);
    }
    let mut more = end.is_some();
    if keys.len() > limit {
        keys.truncate(limit);
        more = true;
    }
    let next = if more { keys.last().cloned() } else { None };
    KeyPage { keys, next }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(last: bool, keys: &[&str]) -> (bool, Vec<Vec<u8>>) {
        (last, keys.iter().map(|k| k.as_bytes().to_vec()).collect())
    }

    fn keys(p: &KeyPage) -> Vec<&str> {
        p.keys
            .iter()
            .map(|k| std::str::from_utf8(k).unwrap())
            .collect()
    }

    #[test]
    fn pages_merge_up_to_the_first_end_that_is_not_the_last() {
        // Replica A's full page ends at "c": "d" on B may be followed on A
        // by keys before it, so this page stops at "c".
        let p = merge(vec![page(false, &["a", "c"]), page(true, &["b", "d"])], 2);
        assert_eq!(keys(&p), ["a", "b"]);
        assert_eq!(p.next.as_deref(), Some(&b"b"[..]));
        let p = merge(vec![page(false, &["a", "c"]), page(true, &["b", "d"])], 10);
        assert_eq!(keys(&p), ["a", "b", "c"]);
        assert_eq!(p.next.as_deref(), Some(&b"c"[..]));
        // Every page is the last: everything, and no next page.
        let p = merge(vec![page(true, &["a", "c"]), page(true, &["c", "d"])], 10);
        assert_eq!(keys(&p), ["a", "c", "d"]);
        assert_eq!(p.next, None);
        let p = merge(vec![page(true, &[]), page(true, &[])], 10);
        assert_eq!(p, KeyPage::default());
    }
}
