//! Changelog replay and truncation (design section 11, "Replay"): how a
//! replica learns the commits it missed from each peer's changelog, and how
//! far a replica may drop its own.
//!
//! Every replica numbers its durable commits (a changelog of `(seq, key,
//! version)`) and remembers, per peer, the last position of that peer's
//! changelog it has replayed (its cursor, durable). Every 2 s it asks each
//! peer for the page after its cursor; [`page`] says which keys of it are
//! newer there than here (the host reads each linearizably, so the protocol
//! learns it) and where the cursor moves once they are read. A cursor the
//! peer has truncated past, or one ahead of the peer's changelog (the peer
//! lost its directory), replays the peer's snapshot instead: every key it
//! has committed with its version ([`stale`]), after which the cursor is the
//! peer's last position when the snapshot began. [`truncation`] says how
//! far a replica drops its changelog: what every peer has replayed, and in
//! any case all but the newest `keep` entries.
//!
//! The daemon (`host/src/membership/tasks.rs`) asks and reads; the
//! simulator drives the same functions.

/// Entries of one page of a changelog or a snapshot.
pub const PAGE: u32 = 1024;

/// A peer's answer to "your changelog after my cursor".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// The first position the peer still holds (`last + 1` when empty).
    pub first: u64,
    /// The peer's newest position (0 before its first commit).
    pub last: u64,
    /// Up to [`PAGE`] entries after the cursor: position, key, version.
    pub entries: Vec<(u64, Vec<u8>, u64)>,
}

/// What to do with a page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Replay {
    /// The peer no longer holds the entries after the cursor (or holds
    /// fewer than the cursor says): replay its snapshot.
    Snapshot,
    /// Read these keys linearizably; once every read succeeded, the cursor
    /// moves to `cursor` (durably). Ask for the next page unless `done`.
    Learn {
        stale: Vec<Vec<u8>>,
        cursor: u64,
        done: bool,
    },
}

/// Decides what a page of a peer's changelog asks of this replica, whose
/// cursor for that peer is `cursor` and whose committed version of a key
/// is `local(key)` (0 if it has none).
pub fn page(cursor: u64, page: &Page, mut local: impl FnMut(&[u8]) -> u64) -> Replay {
    if page.first > cursor + 1 || page.last < cursor {
        return Replay::Snapshot;
    }
    // Positions are consecutive and truncation drops a prefix, so a page
    // that does not start right after the cursor lost entries to a
    // truncation between the peer's reading of its bounds and of the
    // entries: the entries skipped may be the only record of a commit.
    let next = page.entries.first().map(|e| e.0);
    if page.last > cursor && next != Some(cursor + 1) {
        return Replay::Snapshot;
    }
    let Some(&(newest, _, _)) = page.entries.last() else {
        return Replay::Learn {
            stale: Vec::new(),
            cursor,
            done: true,
        };
    };
    let mut stale: Vec<Vec<u8>> = Vec::new();
    for (_, key, version) in &page.entries {
        if local(key) < *version && !stale.contains(key) {
            stale.push(key.clone());
        }
    }
    Replay::Learn {
        stale,
        cursor: newest,
        done: newest >= page.last,
    }
}

/// The keys of a snapshot page (key, the peer's committed version) that are
/// newer there than here.
pub fn stale(entries: &[(Vec<u8>, u64)], mut local: impl FnMut(&[u8]) -> u64) -> Vec<Vec<u8>> {
    entries
        .iter()
        .filter(|(key, version)| local(key) < *version)
        .map(|(key, _)| key.clone())
        .collect()
}

/// How far a replica whose changelog holds `first..=last` drops it, given
/// each peer's cursor for this replica (0 for a peer that did not say):
/// `None` when nothing goes. The newest entry is always kept (it numbers
/// the next commit), so the result is below `last`.
pub fn truncation(first: u64, last: u64, cursors: &[u64], keep: u64) -> Option<u64> {
    let everyone_has = cursors.iter().copied().fold(last, u64::min);
    let upto = everyone_has
        .max(last.saturating_sub(keep))
        .min(last.saturating_sub(1));
    (upto >= first && upto > 0).then_some(upto)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(list: &[(u64, &str, u64)]) -> Vec<(u64, Vec<u8>, u64)> {
        list.iter()
            .map(|(s, k, v)| (*s, k.as_bytes().to_vec(), *v))
            .collect()
    }

    #[test]
    fn a_page_asks_for_the_keys_newer_there_once_each_and_moves_the_cursor() {
        let p = Page {
            first: 1,
            last: 9,
            entries: entries(&[(4, "a", 2), (5, "b", 1), (6, "a", 3), (7, "c", 5)]),
        };
        // Here: a at 1, b at 1, c at 7.
        let local = |k: &[u8]| match k {
            b"a" => 1,
            b"b" => 1,
            _ => 7,
        };
        assert_eq!(
            page(3, &p, local),
            Replay::Learn {
                stale: vec![b"a".to_vec()],
                cursor: 7,
                done: false,
            }
        );
    }

    #[test]
    fn an_empty_page_at_the_end_is_done_and_keeps_the_cursor() {
        let p = Page {
            first: 1,
            last: 9,
            entries: Vec::new(),
        };
        assert_eq!(
            page(9, &p, |_| 0),
            Replay::Learn {
                stale: Vec::new(),
                cursor: 9,
                done: true
            }
        );
    }

    #[test]
    fn a_cursor_behind_the_truncation_or_ahead_of_the_peer_replays_the_snapshot() {
        let truncated = Page {
            first: 50,
            last: 60,
            entries: entries(&[(50, "a", 9)]),
        };
        assert_eq!(page(48, &truncated, |_| 0), Replay::Snapshot);
        // Just at the edge: the entry after the cursor is still there.
        assert!(matches!(page(49, &truncated, |_| 0), Replay::Learn { .. }));
        // The peer's changelog is shorter than the cursor: it lost its
        // directory and numbers from 1 again.
        let fresh = Page {
            first: 1,
            last: 3,
            entries: Vec::new(),
        };
        assert_eq!(page(40, &fresh, |_| 0), Replay::Snapshot);
    }

    /// A page whose bounds were read before a truncation and whose entries
    /// after it: the bounds say the entry after the cursor is there, the
    /// entries start later. Moving the cursor would skip a commit for good
    /// (`ballot-sim --replay` seeds 408, 440 and 611 at n = 3 before this).
    #[test]
    fn a_page_that_skips_positions_after_the_cursor_replays_the_snapshot() {
        let torn = Page {
            first: 5,
            last: 20,
            entries: entries(&[(12, "a", 4), (20, "b", 9)]),
        };
        assert_eq!(page(6, &torn, |_| 0), Replay::Snapshot);
        let emptied = Page {
            first: 5,
            last: 20,
            entries: Vec::new(),
        };
        assert_eq!(page(6, &emptied, |_| 0), Replay::Snapshot);
    }

    #[test]
    fn a_snapshot_asks_for_what_is_newer_there() {
        let snapshot = vec![(b"a".to_vec(), 3), (b"b".to_vec(), 1)];
        assert_eq!(
            stale(&snapshot, |k| if k == b"a" { 2 } else { 1 }),
            vec![b"a".to_vec()]
        );
    }

    #[test]
    fn truncation_keeps_what_a_peer_has_not_replayed_unless_it_is_too_far_behind() {
        // Peers replayed up to 70 and 80: drop up to 70.
        assert_eq!(truncation(1, 100, &[70, 80], 1000), Some(70));
        // A peer far behind (or silent) holds nothing back past `keep`.
        assert_eq!(truncation(1, 100, &[0, 80], 10), Some(90));
        // Nothing to drop: already truncated there, or a single entry.
        assert_eq!(truncation(71, 100, &[70, 80], 1000), None);
        assert_eq!(truncation(1, 1, &[1], 0), None);
        // The newest entry stays.
        assert_eq!(truncation(1, 100, &[100, 100], 0), Some(99));
        assert_eq!(truncation(1, 0, &[], 0), None);
    }
}
