//! What every command of the `ballot` CLI shares: how it logs, and how it
//! fails. Commands import this, never `cli` (which imports them).

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

/// Prints `ballot: MESSAGE` on stderr; the command's exit code.
pub fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("ballot: {message}");
    ExitCode::FAILURE
}
