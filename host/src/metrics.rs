//! Prometheus metrics of one replica, served at `GET /metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    // 50 µs to about 13 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

fn sizes() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 14))
}

/// Every metric a replica exports.
pub struct Metrics {
    registry: Registry,
    /// Client requests by operation and outcome.
    pub requests: Family<Labels, Counter>,
    pub request_seconds: HistogramFamily,
    /// Commands that wrote a new version, by path (fast or classic).
    pub proposals_chosen: Family<Labels, Counter>,
    /// Attempts beyond the first, summed over commands.
    pub retries: Counter,
    /// Classic rounds (prepares) started.
    pub ballot_bumps: Counter,
    /// Wall time of guest calls, by call (`step`, `release`).
    pub guest_seconds: HistogramFamily,
    /// Events handed to the protocol per `step`.
    pub step_events: Histogram,
    /// Write transactions: their duration including fsync, and their size.
    pub fsync_seconds: Histogram,
    pub group_commit_writes: Histogram,
    pub group_commit_readies: Histogram,
    /// The log applier's LMDB transactions: duration, and log records in each.
    pub log_apply_seconds: Histogram,
    pub log_apply_records: Histogram,
    /// Time group commits waited for the log's applier before appending.
    pub log_wait_seconds: Histogram,
    /// Log records, and their bytes of writes, LMDB does not hold yet
    /// (set when `/metrics` is read).
    pub log_unapplied_records: Gauge,
    pub log_unapplied_bytes: Gauge,
    /// 1 while the outgoing link to a peer is up.
    pub peer_connected: Family<Labels, Gauge>,
    /// Messages to a peer dropped because its queue was full or it was down.
    pub peer_dropped: Family<Labels, Counter>,
    /// Inbound peer messages dropped because the protocol's queue was full.
    pub inbound_dropped: Counter,
    /// Inbound peer frames dropped at the transport because their sender is
    /// not a member here (before any decoding, storage read or guest call).
    pub inbound_nonmember: Counter,
    /// Commands peers forwarded to this replica as leader, dropped because
    /// those it holds unanswered (or held across a swap) reached their byte
    /// bound; their senders time out.
    pub forwards_dropped: Counter,
    /// Keys whose events a step left for the next one, to keep the key
    /// states it hands the protocol within their byte bound.
    pub step_deferred: Counter,
    /// Peer connections refused (TLS failure, wrong identity, bad frames).
    pub peer_refused: Family<Labels, Counter>,
    /// Protocol instances replaced, by cause (`swap`, `trap`).
    pub protocol_restarts: Family<Labels, Counter>,
    /// How long a swap waited for in-flight commands to finish.
    pub swap_drain_seconds: Histogram,
    /// Policy calls that trapped, ran out of time or memory, or returned
    /// something refused.
    pub policy_failures: Counter,
    /// Watchers (`/v1/watch`) connected now.
    pub watchers: Gauge,
    /// Events sent to watchers.
    pub watch_events: Counter,
    /// Watchers ended, by reason (`client`, `gone`, `error`, `shutdown`).
    pub watchers_ended: Family<Labels, Counter>,
    /// Live leases this replica holds a copy of (its reaper's last look).
    pub leases_live: Gauge,
    /// Leases this replica expired.
    pub lease_expiries: Counter,
    /// Keys this replica deleted because their lease ended.
    pub lease_keys_deleted: Counter,
    /// 1 for the protocol this replica runs, labelled with its name,
    /// version and component id.
    pub protocol_info: Family<Labels, Gauge>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ballot");
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "requests",
            "Client requests by operation and outcome",
            requests.clone(),
        );
        let request_seconds: HistogramFamily = Family::new_with_constructor(seconds);
        registry.register(
            "request_duration_seconds",
            "Client request latency by operation",
            request_seconds.clone(),
        );
        let proposals_chosen = Family::<Labels, Counter>::default();
        registry.register(
            "proposals_chosen",
            "Commands that wrote a new version, by path: fast round, led (phase 2 only, by the key's leader) or classic (after a prepare)",
            proposals_chosen.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "retries",
            "Attempts beyond the first, over all commands",
            retries.clone(),
        );
        let ballot_bumps = Counter::default();
        registry.register(
            "ballot_bumps",
            "Classic rounds (prepares) started",
            ballot_bumps.clone(),
        );
        let guest_seconds: HistogramFamily = Family::new_with_constructor(seconds);
        registry.register(
            "guest_call_seconds",
            "Time spent in protocol component calls",
            guest_seconds.clone(),
        );
        let step_events = sizes();
        registry.register(
            "step_events",
            "Events handed to the protocol per step",
            step_events.clone(),
        );
        let fsync_seconds = seconds();
        registry.register(
            "fsync_seconds",
            "Group commits: log append and fsync duration",
            fsync_seconds.clone(),
        );
        let group_commit_writes = sizes();
        registry.register(
            "group_commit_writes",
            "Key writes per group commit",
            group_commit_writes.clone(),
        );
        let log_apply_seconds = seconds();
        registry.register(
            "log_apply_seconds",
            "The log applier's LMDB transactions: write and both flushes",
            log_apply_seconds.clone(),
        );
        let log_apply_records = sizes();
        registry.register(
            "log_apply_records",
            "Log records per LMDB transaction of the applier",
            log_apply_records.clone(),
        );
        let log_wait_seconds = seconds();
        registry.register(
            "log_wait_seconds",
            "Group commits that waited for the log applier (the file's bound, or bytes not yet applied): how long",
            log_wait_seconds.clone(),
        );
        let log_unapplied_records = Gauge::default();
        registry.register(
            "log_unapplied_records",
            "Log records durable but not yet in LMDB",
            log_unapplied_records.clone(),
        );
        let log_unapplied_bytes = Gauge::default();
        registry.register(
            "log_unapplied_bytes",
            "Bytes of writes in log records not yet in LMDB",
            log_unapplied_bytes.clone(),
        );
        let group_commit_readies = sizes();
        registry.register(
            "group_commit_readies",
            "Protocol steps made durable per group commit",
            group_commit_readies.clone(),
        );
        let peer_connected = Family::<Labels, Gauge>::default();
        registry.register(
            "peer_connected",
            "1 while the link to a peer is up",
            peer_connected.clone(),
        );
        let peer_dropped = Family::<Labels, Counter>::default();
        registry.register(
            "peer_messages_dropped",
            "Messages to a peer dropped (queue full or link down)",
            peer_dropped.clone(),
        );
        let inbound_dropped = Counter::default();
        registry.register(
            "inbound_messages_dropped",
            "Peer messages dropped because the protocol queue was full",
            inbound_dropped.clone(),
        );
        let inbound_nonmember = Counter::default();
        registry.register(
            "inbound_nonmember_frames_dropped",
            "Peer frames dropped at the transport: the sender is not a member here",
            inbound_nonmember.clone(),
        );
        let forwards_dropped = Counter::default();
        registry.register(
            "forwards_dropped",
            "Forwarded commands dropped: those held unanswered reached their byte bound",
            forwards_dropped.clone(),
        );
        let step_deferred = Counter::default();
        registry.register(
            "step_keys_deferred",
            "Keys whose events waited for the next step: the states loaded passed the step's byte bound",
            step_deferred.clone(),
        );
        let peer_refused = Family::<Labels, Counter>::default();
        registry.register(
            "peer_refused",
            "Peer connections refused, by reason",
            peer_refused.clone(),
        );
        let protocol_restarts = Family::<Labels, Counter>::default();
        registry.register(
            "protocol_restarts",
            "Protocol instances replaced, by cause (swap, trap, deadline, invalid)",
            protocol_restarts.clone(),
        );
        let swap_drain_seconds = seconds();
        registry.register(
            "swap_drain_seconds",
            "Time a protocol swap waited for in-flight commands",
            swap_drain_seconds.clone(),
        );
        let policy_failures = Counter::default();
        registry.register(
            "policy_failures",
            "Policy calls that trapped, ran out of time or memory, or returned a refused value",
            policy_failures.clone(),
        );
        let watchers = Gauge::default();
        registry.register("watchers", "Watchers connected now", watchers.clone());
        let watch_events = Counter::default();
        registry.register(
            "watch_events",
            "Events sent to watchers",
            watch_events.clone(),
        );
        let watchers_ended = Family::<Labels, Counter>::default();
        registry.register(
            "watchers_ended",
            "Watchers ended, by reason: client (gone away or idle), gone (behind the changelog), error, shutdown",
            watchers_ended.clone(),
        );
        let leases_live = Gauge::default();
        registry.register(
            "leases_live",
            "Live leases this replica holds a copy of",
            leases_live.clone(),
        );
        let lease_expiries = Counter::default();
        registry.register(
            "lease_expiries",
            "Leases this replica expired",
            lease_expiries.clone(),
        );
        let lease_keys_deleted = Counter::default();
        registry.register(
            "lease_keys_deleted",
            "Keys this replica deleted because their lease ended",
            lease_keys_deleted.clone(),
        );
        let protocol_info = Family::<Labels, Gauge>::default();
        registry.register(
            "protocol_info",
            "1 for the protocol this replica runs",
            protocol_info.clone(),
        );
        Metrics {
            protocol_restarts,
            swap_drain_seconds,
            policy_failures,
            watchers,
            watch_events,
            watchers_ended,
            leases_live,
            log_apply_seconds,
            log_apply_records,
            log_wait_seconds,
            log_unapplied_records,
            log_unapplied_bytes,
            lease_expiries,
            lease_keys_deleted,
            protocol_info,
            registry,
            requests,
            request_seconds,
            proposals_chosen,
            retries,
            ballot_bumps,
            guest_seconds,
            step_events,
            fsync_seconds,
            group_commit_writes,
            group_commit_readies,
            peer_connected,
            peer_dropped,
            inbound_dropped,
            inbound_nonmember,
            forwards_dropped,
            step_deferred,
            peer_refused,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A single-label set.
pub fn label(name: &'static str, value: impl Into<String>) -> Labels {
    vec![(name, value.into())]
}

/// A two-label set.
pub fn labels2(a: (&'static str, &str), b: (&'static str, &str)) -> Labels {
    vec![(a.0, a.1.to_string()), (b.0, b.1.to_string())]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the shipped Grafana dashboard charts is one a replica
    /// exports (a renamed metric breaks this test, not the dashboard).
    #[test]
    fn the_dashboard_charts_only_exported_metrics() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../deploy/grafana/ballot.json")).unwrap();
        let m = Metrics::new();
        // Families render once they have a child.
        let l = label("x", "y".to_string());
        m.requests
            .get_or_create(&labels2(("op", "x"), ("outcome", "y")))
            .inc();
        m.request_seconds.get_or_create(&l).observe(0.1);
        m.proposals_chosen.get_or_create(&l).inc();
        m.guest_seconds.get_or_create(&l).observe(0.1);
        m.peer_connected.get_or_create(&l).set(1);
        m.peer_dropped.get_or_create(&l).inc();
        m.peer_refused.get_or_create(&l).inc();
        m.protocol_restarts.get_or_create(&l).inc();
        m.protocol_info.get_or_create(&l).set(1);
        let rendered = m.render();
        let exported: Vec<&str> = rendered
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert!(exported.contains(&"ballot_requests"), "{rendered}");
        let mut charted = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                let mut rest = expr;
                while let Some(at) = rest.find("ballot_") {
                    let name: String = rest[at..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    rest = &rest[at + name.len()..];
                    let base = ["_total", "_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| name.strip_suffix(s))
                        .unwrap_or(&name);
                    assert!(
                        exported.contains(&base),
                        "panel {:?} charts {name}, which no replica exports",
                        panel["title"]
                    );
                    charted += 1;
                }
            }
        }
        assert!(charted >= 20, "{charted}");
    }
}
