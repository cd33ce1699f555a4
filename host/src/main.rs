//! `ballot`: the Ballot daemon and command-line tool.

/// The daemon allocates small buffers on every thread for every request
/// and frame (hyper, quinn, tokio, the storage queue); glibc's allocator
/// spent about a tenth of the CPU under load on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ballot::cli::main()
}
