//! `ballot`: the Ballot daemon and command-line tool.

/// The daemon allocates small buffers on every thread for every request
/// and frame (hyper, quinn, tokio, the storage queue); glibc's malloc and
/// free were about 6.5 % of all CPU in the I/O threads alone under load
/// (spread at 64 clients).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ballot::cli::main()
}
