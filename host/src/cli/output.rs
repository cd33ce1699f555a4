//! What every command of the `ballot` CLI shares: how it logs, how it
//! prints, and how it fails, with the one mapping from a failure to an exit
//! code:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | an error: a bad request (4xx other than below), a bad answer, a local failure |
//! | 2 | bad arguments (from clap) |
//! | 3 | not found: the key has no value, no such component (404) |
//! | 4 | refused: a precondition failed or the policy refused (409, 412) |
//! | 5 | unavailable: no replica reachable, or the cluster answered 5xx |

use std::io::IsTerminal;
use std::process::ExitCode;

/// Log output format.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Logs on stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// How read commands print what they found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Tables and lines for people.
    Text,
    /// One JSON document on stdout, for scripts.
    Json,
}

/// Prints one JSON document on stdout.
pub fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("a JSON value serializes")
    );
}

/// Prints `ballot: MESSAGE` on stderr; the command's exit code (1).
pub fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("ballot: {message}");
    ExitCode::FAILURE
}

/// Not found.
pub const ABSENT: u8 = 3;
/// Refused by a precondition or the policy.
pub const REFUSED: u8 = 4;
/// No replica could answer.
pub const UNAVAILABLE: u8 = 5;

/// The exit code of an HTTP status that is not a success.
pub fn exit_for(status: u16) -> ExitCode {
    match status {
        404 => ExitCode::from(ABSENT),
        409 | 412 => ExitCode::from(REFUSED),
        500..=599 => ExitCode::from(UNAVAILABLE),
        _ => ExitCode::FAILURE,
    }
}

/// Prints an error answer of the API (`STATUS CODE: MESSAGE`); its exit code.
pub fn report(r: &crate::client::Response) -> ExitCode {
    eprintln!(
        "ballot: {} {}: {}",
        r.status.as_u16(),
        r.error_code().unwrap_or_default(),
        r.error_message()
    );
    exit_for(r.status.as_u16())
}

/// Prints why no answer came (the replica is not reachable); exit code 5.
pub fn unreachable(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("ballot: {message}");
    ExitCode::from(UNAVAILABLE)
}

/// Prints a failure of the store client; its exit code.
pub fn client_failed(e: ballot_client::Error) -> ExitCode {
    eprintln!("ballot: {e}");
    match e {
        ballot_client::Error::Refused { .. } => ExitCode::from(REFUSED),
        ballot_client::Error::Unavailable { .. } => ExitCode::from(UNAVAILABLE),
        ballot_client::Error::Invalid { status, .. } => exit_for(status),
    }
}

/// Prints rows as left-aligned columns.
pub fn table(rows: Vec<Vec<String>>) {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
}
