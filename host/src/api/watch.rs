//! `GET /v1/watch?prefix=P&from=SEQ` (or `key=K`): the commits this
//! replica learns, as Server-Sent Events, read from its changelog.
//!
//! Each event is `id: <seq>` and `data: {"seq","key","version",
//! "value"|"value_hex"|"deleted":true,"jumped"}`, where `seq` is the
//! position in this replica's changelog: `from=SEQ` (or `Last-Event-ID:
//! SEQ-1`) resumes on the same replica with nothing missed and nothing
//! twice. Changelog entries hold versions, not values, so an event carries
//! the key's value as committed when the event is read: if the key has moved
//! on since, the event names the newer version (`jumped: true`, as for a
//! version this replica never learned) and the entries of the versions it
//! covers are skipped. Per key, versions only grow. A position already
//! truncated is 410 `gone` with the oldest position held; the client lists
//! the prefix again and watches from there.
//!
//! A watcher is read as it is consumed (nothing is buffered for it beyond
//! about 1 MiB of events). A client that stops reading while events flow
//! stops taking bytes once its buffers fill, and the idle limit
//! (`http_idle_secs`) closes it; on a quiet prefix the heartbeats
//! (every 5 s, or half the idle limit) are small enough that buffers take
//! them for a long time, which costs a connection and nothing more.
//! Watchers end when the replica shuts down.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::access::Need;
use super::body::current_json;
use super::{ApiError, App};
use crate::storage::Storage;

/// Changelog entries read at a time.
const PAGE: usize = 256;
/// Bytes of events a watcher holds ready, about: a page stops early past
/// it, so a watcher costs one value or so beyond this, whatever it watches.
const READY_BYTES: usize = 1 << 20;
/// How often a watcher that has seen everything looks again.
const POLL: Duration = Duration::from_millis(50);
/// Keys whose last version a watcher remembers (to say `jumped`); past it
/// the memory starts again (at most about 2 MiB of keys).
const SEEN_MAX: usize = 4096;
/// Watchers one replica serves at once (well below the connection cap).
pub const WATCHERS_MAX: usize = 256;
/// Changelog pages one poll reads before it lets other tasks run.
const PAGES_PER_TURN: usize = 4;

#[derive(Deserialize)]
pub(super) struct WatchParams {
    prefix: Option<String>,
    key: Option<String>,
    from: Option<u64>,
}

struct Watcher {
    storage: Storage,
    /// The prefix, or the one key (`exact`).
    prefix: Vec<u8>,
    exact: bool,
    next: u64,
    ready: VecDeque<Event>,
    seen: HashMap<Vec<u8>, u64>,
    ended: bool,
    /// Why it ended, for `ballot_watchers_ended_total`: `gone` (it fell
    /// behind the changelog's truncation), `error`, `shutdown`, or, when
    /// none is set, `client` (the client went away or stopped reading and
    /// the idle limit closed it).
    reason: Option<&'static str>,
    _slot: tokio::sync::OwnedSemaphorePermit,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Watcher {
    fn wants(&self, key: &[u8]) -> bool {
        key.first() != Some(&0)
            && if self.exact {
                key == self.prefix
            } else {
                key.starts_with(&self.prefix)
            }
    }

    /// Reads the next page of the changelog into events; `false` when
    /// there was nothing new.
    fn read(&mut self) -> bool {
        let (first, _, entries) = match self.storage.changes_page(self.next, PAGE) {
            Ok(page) => page,
            Err(e) => {
                self.end("error", serde_json::json!({ "message": e.to_string() }));
                return true;
            }
        };
        if self.next < first {
            // Truncated while this watcher was behind.
            self.end("gone", serde_json::json!({ "oldest": first }));
            return true;
        }
        if entries.is_empty() {
            return false;
        }
        let mut bytes = 0;
        for entry in entries {
            if bytes > READY_BYTES {
                break;
            }
            self.next = entry.seq + 1;
            if !self.wants(&entry.key) {
                continue;
            }
            // The page waited for LMDB to hold what was logged: the
            // entry's value is there, or a newer one.
            let committed = match self.storage.committed_applied(&entry.key) {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    self.end("error", serde_json::json!({ "message": e.to_string() }));
                    return true;
                }
            };
            // The key moved on since this entry: a later entry holds the
            // version its value is now (a commit writes its value and its
            // entry in one transaction), and the event goes there, so an
            // event's id is always the position of the version it carries
            // and resuming after it never repeats it.
            if committed.version != entry.version {
                self.skipped(&entry.key);
                continue;
            }
            let known = self.seen.get(&entry.key).copied();
            let jumped = known.is_some_and(|v| entry.version > v + 1);
            let mut data = current_json(&ballot_core::Current {
                value: committed.value.clone(),
                version: committed.version,
            });
            if committed.value.is_none() {
                data.as_object_mut().expect("an object").remove("value");
                data["deleted"] = true.into();
            }
            data["seq"] = entry.seq.into();
            data["key"] = String::from_utf8_lossy(&entry.key).into_owned().into();
            data["jumped"] = jumped.into();
            if self.seen.len() >= SEEN_MAX {
                self.seen.clear();
            }
            self.seen.insert(entry.key, committed.version);
            let data = data.to_string();
            bytes += data.len();
            self.ready
                .push_back(Event::default().id(entry.seq.to_string()).data(data));
        }
        true
    }

    /// Remembers that versions of `key` went by without an event, so its
    /// next event says `jumped`.
    fn skipped(&mut self, key: &[u8]) {
        if self.seen.len() >= SEEN_MAX {
            self.seen.clear();
        }
        let v = self.seen.entry(key.to_vec()).or_insert(0);
        // Any version later than the one recorded is then a jump.
        *v = 0;
    }

    fn end(&mut self, kind: &'static str, data: serde_json::Value) {
        self.ready
            .push_back(Event::default().event(kind).data(data.to_string()));
        self.ended = true;
        self.reason = Some(kind);
    }
}

impl Watcher {
    /// Ends the stream without an event.
    fn stop(&mut self, reason: &'static str) {
        self.ended = true;
        self.reason = Some(reason);
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.metrics.watchers.dec();
        self.metrics
            .watchers_ended
            .get_or_create(&crate::metrics::label(
                "reason",
                self.reason.unwrap_or("client"),
            ))
            .inc();
    }
}

pub(super) async fn watch(State(app): State<App>, request: Request) -> Result<Response, ApiError> {
    let params = Query::<WatchParams>::try_from_uri(request.uri())
        .map_err(|e| ApiError::bad_request("bad-parameter", e.body_text()))?
        .0;
    let (prefix, exact) = match (params.prefix, params.key) {
        (Some(p), None) => (p, false),
        (None, Some(k)) if !k.is_empty() => (k, true),
        (None, None) => (String::new(), false),
        _ => {
            return Err(ApiError::bad_request(
                "bad-parameter",
                "give prefix=P or key=K, not both",
            ))
        }
    };
    super::access::check_request(&app, Need::Read(&prefix), &request)?;
    super::kv::check_prefix(&prefix)?;
    let resume = request
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|id| id.saturating_add(1));
    let (first, last) = app
        .storage
        .changelog_bounds()
        .map_err(|e| ApiError::unavailable("storage", e.to_string()))?;
    // A reconnecting EventSource sends the URL it opened with and the last
    // id it saw: the id wins.
    let from = resume.or(params.from).unwrap_or(last + 1);
    if from > last + 1 {
        return Err(ApiError::bad_request(
            "bad-parameter",
            format!(
                "position {from} is past this replica's changelog (it ends at {last}): positions \
                 belong to one replica and one data directory; list the prefix and watch again"
            ),
        ));
    }
    if from < first {
        return Err(ApiError::new(
            StatusCode::GONE,
            "gone",
            format!(
                "position {from} is no longer held (the oldest is {first}): list the prefix \
                 and watch from there"
            ),
        )
        .with("oldest", first));
    }
    let Ok(slot) = app.watchers.clone().try_acquire_owned() else {
        return Err(ApiError::unavailable(
            "overloaded",
            format!("this replica serves {WATCHERS_MAX} watchers already"),
        ));
    };
    app.metrics.watchers.inc();
    let watcher = Watcher {
        storage: app.storage.clone(),
        prefix: prefix.into_bytes(),
        exact,
        next: from,
        ready: VecDeque::new(),
        seen: HashMap::new(),
        ended: false,
        reason: None,
        _slot: slot,
        metrics: app.metrics.clone(),
    };
    let metrics = app.metrics.clone();
    let closing = app.closing.clone();
    let events = futures_util::stream::unfold(watcher, move |mut w| {
        let (metrics, closing) = (metrics.clone(), closing.clone());
        async move {
            let mut pages = 0;
            loop {
                if let Some(event) = w.ready.pop_front() {
                    metrics.watch_events.inc();
                    return Some((Ok::<Event, Infallible>(event), w));
                }
                if w.ended {
                    return None;
                }
                if closing.load(std::sync::atomic::Ordering::Relaxed) {
                    w.stop("shutdown");
                    return None;
                }
                if !w.read() {
                    tokio::time::sleep(POLL).await;
                } else {
                    // A long run of entries outside the prefix reads page
                    // after page: the runtime's other tasks go in between.
                    pages += 1;
                    if pages % PAGES_PER_TURN == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(app.heartbeat))
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A watcher that fell behind while the changelog was truncated past
    /// its position ends with a `gone` event naming the oldest position
    /// held, and is counted as ended for that reason: on a real LMDB file.
    #[test]
    fn a_watcher_behind_the_truncation_ends_gone_mid_stream() {
        let dir = std::env::temp_dir().join(format!("ballot-watch-gone-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (storage, _) = Storage::open(&dir, 1, 1 << 24).unwrap();
        let write = |i: u64| ballot_core::Write {
            key: format!("w/{}", i % 3).into_bytes(),
            state: vec![1],
            commit: Some(ballot_core::Commit {
                version: i / 3 + 1,
                value: Some(vec![b'a' + i as u8]),
            }),
        };
        let writes: Vec<_> = (0..6).map(write).collect();
        storage.commit(writes.to_vec()).unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let mut watcher = Watcher {
            storage: storage.clone(),
            prefix: b"w/".to_vec(),
            exact: false,
            next: 1,
            ready: VecDeque::new(),
            seen: HashMap::new(),
            ended: false,
            reason: None,
            _slot: slots.try_acquire_owned().unwrap(),
            metrics: metrics.clone(),
        };
        // Mid-stream: the first page is read (entries 1 to 6; the three
        // superseded since are skipped), and the watcher stands at 7.
        assert!(watcher.read());
        assert_eq!(watcher.ready.len(), 3);
        assert_eq!(watcher.next, 7);
        assert!(!watcher.ended);
        // Later commits (7 to 12), then a truncation past where it stands.
        let later: Vec<_> = (6..12).map(write).collect();
        storage.commit(later.to_vec()).unwrap();
        assert_eq!(storage.truncate_changelog(8).unwrap(), 8);
        assert!(watcher.read());
        assert!(watcher.ended);
        assert_eq!(watcher.reason, Some("gone"));
        let last = format!("{:?}", watcher.ready.back().unwrap());
        assert!(
            last.contains("gone") && last.contains("\\\"oldest\\\":9"),
            "{last}"
        );
        drop(watcher);
        let ended = metrics
            .watchers_ended
            .get_or_create(&crate::metrics::label("reason", "gone"))
            .get();
        assert_eq!(ended, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
