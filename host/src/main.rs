//! `ballot`: the Ballot command-line tool.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Ballot: a strongly consistent key-value store whose consensus protocol is
/// a WebAssembly component.
#[derive(Parser, Debug)]
#[command(name = "ballot", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Describe the embedded default components: names, versions, formats.
    Components,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    match Cli::parse().command {
        Cmd::Components => match ballot::runtime::describe_embedded() {
            Ok(lines) => {
                for line in lines {
                    println!("{line}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ballot: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
