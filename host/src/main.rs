//! `ballot`: the Ballot daemon and command-line tool.

fn main() -> std::process::ExitCode {
    ballot::cli::main()
}
