//! `ballot cluster status`, `add` and `remove`.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;

use super::output;
use super::Endpoint;
use crate::client::Client;
use crate::membership::{MemberChange, MembersView, Phase, Progress};

/// A progress bar `width` characters wide.
pub fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        width
    } else {
        ((done.min(total) as u128 * width as u128) / total as u128) as usize
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// One line for a catch-up or sweep: bar, counts and rates.
pub fn progress_line(id: u32, p: &Progress) -> String {
    let secs = (p.updated_ms.saturating_sub(p.started_ms) as f64 / 1000.0).max(0.001);
    format!(
        "replica {id} {} (epoch {}, {}): {} {}/{} keys, {} bytes, {:.0} keys/s, {:.0} bytes/s",
        p.task,
        p.epoch,
        p.phase,
        bar(p.keys_done, p.keys_total, 30),
        p.keys_done,
        p.keys_total,
        p.bytes,
        p.keys_done as f64 / secs,
        p.bytes as f64 / secs,
    )
}

async fn view(client: &Client) -> Result<MembersView, String> {
    match client
        .json(Method::GET, "/v1/cluster/members", Bytes::new())
        .await?
    {
        Ok(v) => serde_json::from_value(v).map_err(|e| format!("bad membership view: {e}")),
        Err(r) => Err(format!("{} {}", r.status, r.error_message())),
    }
}

/// Prints the membership and the progress of every task under way.
pub async fn print_members(client: &Client) {
    match view(client).await {
        Ok(v) => {
            let r = &v.record;
            println!(
                "membership epoch {} (fast round {}), voters {:?}, learners {:?}",
                r.epoch,
                if r.fast { "on" } else { "off" },
                r.members().voters,
                r.members().learners
            );
            for c in &r.queue {
                println!("queued: {:?} replica {}", c.action, c.id);
            }
            for s in &v.status {
                match (&s.status, &s.error) {
                    (Some(st), _) => {
                        if let Some(p) = &st.progress {
                            println!("{}", progress_line(s.id, p));
                        }
                    }
                    (None, Some(e)) => println!("replica {}: no status ({e})", s.id),
                    (None, None) => {}
                }
            }
        }
        Err(e) => println!("membership: {e}"),
    }
}

/// Queues a change and, unless `wait` is off, follows it to the end.
pub async fn change(
    client: Client,
    method: Method,
    path: String,
    body: String,
    wait: bool,
) -> ExitCode {
    let queued: MemberChange = match client.json(method, &path, Bytes::from(body)).await {
        Ok(Ok(v)) => match serde_json::from_value(v) {
            Ok(c) => c,
            Err(e) => return output::fail(format!("bad answer: {e}")),
        },
        Ok(Err(r)) => return output::report(&r),
        Err(e) => return output::unreachable(e),
    };
    println!("queued: {:?} replica {}", queued.action, queued.id);
    if !wait {
        return ExitCode::SUCCESS;
    }
    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let mut last_epoch = 0;
    loop {
        match view(&client).await {
            Ok(v) => {
                if let Some(d) = v.record.done.iter().find(|d| {
                    d.id == queued.id
                        && d.action == queued.action
                        && d.requested_ms == queued.requested_ms
                }) {
                    if tty {
                        println!();
                    }
                    if d.aborted {
                        return output::fail(format!(
                            "the change was abandoned at epoch {}",
                            d.epoch
                        ));
                    }
                    println!(
                        "done at membership epoch {} in {:.1} s",
                        d.epoch,
                        started.elapsed().as_secs_f64()
                    );
                    return ExitCode::SUCCESS;
                }
                let task = v
                    .status
                    .iter()
                    .filter_map(|s| Some((s.id, s.status.as_ref()?.progress.clone()?)))
                    .find(|(_, p)| p.phase != Phase::Done);
                let line = match task {
                    Some((id, p)) => progress_line(id, &p),
                    None => format!(
                        "epoch {}, voters {:?}, learners {:?}",
                        v.record.epoch,
                        v.record.members().voters,
                        v.record.members().learners
                    ),
                };
                if tty {
                    print!("\r\x1b[2K{line}");
                    let _ = std::io::stdout().flush();
                } else if v.record.epoch != last_epoch
                    || last_print.elapsed() > Duration::from_secs(5)
                {
                    println!("{line}");
                    last_print = Instant::now();
                }
                last_epoch = v.record.epoch;
            }
            Err(e) => {
                if !tty {
                    println!("waiting: {e}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub(super) async fn status(endpoint: Endpoint) -> ExitCode {
    let client = endpoint.client();
    let view = match client.cluster().await {
        Ok(v) => v,
        Err(e) => return output::unreachable(e),
    };
    let mut rows = vec![[
        "ID".to_string(),
        "ROLE".into(),
        "EPOCH".into(),
        "PEER".into(),
        "HTTP".into(),
        format!("LINK FROM {}", view.id),
        "HEALTH".into(),
        "INCARNATION".into(),
        "PROTOCOL".into(),
        "POLICY".into(),
    ]];
    for r in &view.replicas {
        let remote = match &r.http {
            Some(url) if r.id == view.id => Some(Ok(view.clone())),
            Some(url) => Some(client.at(url).cluster().await),
            None => None,
        };
        let (health, epoch, incarnation, protocol, policy) = match remote {
            Some(Ok(v)) => (
                if v.healthy {
                    "ok".to_string()
                } else {
                    format!("stopped: {}", v.error.unwrap_or_default())
                },
                v.epoch.to_string(),
                v.incarnation.to_string(),
                format!("{} {} ({})", v.protocol.name, v.protocol.version, v.core),
                format!("{} {}", v.policy.name, v.policy.version),
            ),
            Some(Err(_)) => (
                "unreachable".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ),
            None => (
                "unknown".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ),
        };
        let mut link = r.link.to_string();
        if let Some(e) = &r.last_error {
            link = format!("{link} ({e})");
        }
        rows.push([
            r.id.to_string(),
            r.role.map_or_else(|| "-".into(), |r| r.to_string()),
            epoch,
            r.peer.clone(),
            r.http.clone().unwrap_or_else(|| "-".into()),
            link,
            health,
            incarnation,
            protocol,
            policy,
        ]);
    }
    output::table(rows.into_iter().map(Vec::from).collect());
    print_members(&client).await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_fill_in_proportion() {
        assert_eq!(bar(0, 10, 10), "[..........]");
        assert_eq!(bar(5, 10, 10), "[#####.....]");
        assert_eq!(bar(12, 10, 4), "[####]");
        assert_eq!(bar(0, 0, 4), "[####]");
    }
}
