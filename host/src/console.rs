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

/// Prints `ballot: MESSAGE` on stderr; the command's exit code.
pub fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("ballot: {message}");
    ExitCode::FAILURE
}
