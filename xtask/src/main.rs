//! Builds Ballot's guest components (the defaults, the examples and the test
//! fixtures) and checks the committed ones.
//!
//! ```text
//! cargo xtask guests          # rebuild every committed component from its source
//! cargo xtask guests --check  # rebuild into target/ and compare with the committed files
//! ```
//!
//! The host embeds the committed components, so a plain `cargo build` needs
//! no wasm toolchain. This task needs one: rustup's `wasm32-unknown-unknown`
//! target when it is installed, otherwise Debian's `rustc-web` with
//! `-Zbuild-std` (see `docs/design.md`, "Building the guests").

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ballot_guest_build::{componentize, sha256_hex, Toolchain, TARGET};

/// (crate, artifact stem, committed file, relative to the workspace)
const GUESTS: [(&str, &str, &str); 13] = [
    (
        "ballot-guest-protocol",
        "ballot_guest_protocol",
        "host/components/protocol.wasm",
    ),
    (
        "ballot-guest-register",
        "ballot_guest_register",
        "host/components/register.wasm",
    ),
    (
        "ballot-guest-protocol-next",
        "ballot_guest_protocol_next",
        "host/components/protocol-next.wasm",
    ),
    ("counter", "counter", "examples/counter/counter.wasm"),
    ("lww", "lww", "examples/lww/lww.wasm"),
    (
        "reservation",
        "reservation",
        "examples/reservation/reservation.wasm",
    ),
    ("document", "document", "examples/document/document.wasm"),
    ("hostile", "hostile", "tests/components/hostile.wasm"),
    ("stray", "stray", "tests/components/stray.wasm"),
    ("foreign", "foreign", "tests/components/foreign.wasm"),
    (
        "protocol-spin",
        "protocol_spin",
        "tests/components/protocol-spin.wasm",
    ),
    (
        "protocol-trap",
        "protocol_trap",
        "tests/components/protocol-trap.wasm",
    ),
    (
        "protocol-invalid",
        "protocol_invalid",
        "tests/components/protocol-invalid.wasm",
    ),
];
const MANIFEST: &str = "host/components/MANIFEST";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["guests"] => build(false),
        ["guests", "--check"] => build(true),
        _ => Err("usage: cargo xtask guests [--check]".to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

fn build(check: bool) -> Result<(), String> {
    let root = workspace();
    let tc = Toolchain::find(&root)?;
    let target_dir = root.join("target/guest");
    let mut cmd = tc.build_command();
    cmd.current_dir(&root)
        // Keep the guests' build away from the host's: different flags.
        .args(["--profile", "guest", "--target-dir"])
        .arg(&target_dir);
    for (krate, _, _) in GUESTS {
        cmd.args(["-p", krate]);
    }
    eprintln!("xtask: building guests with {}", tc.description);
    let status = cmd.status().map_err(|e| format!("running cargo: {e}"))?;
    if !status.success() {
        return Err(format!("guest build failed ({status})"));
    }

    let mut manifest = format!("# Built by `cargo xtask guests`; checked by `cargo xtask guests --check`.\ntoolchain = {}\n", tc.description);
    let mut mismatches = Vec::new();
    for (_, stem, file) in GUESTS {
        let core = target_dir
            .join(TARGET)
            .join("guest")
            .join(format!("{stem}.wasm"));
        let module =
            std::fs::read(&core).map_err(|e| format!("reading {}: {e}", core.display()))?;
        let component =
            componentize(&module).map_err(|e| format!("encoding {file} as a component: {e}"))?;
        manifest.push_str(&format!("{file} = {}\n", sha256_hex(&component)));
        let dest = root.join(file);
        if check {
            let committed =
                std::fs::read(&dest).map_err(|e| format!("reading {}: {e}", dest.display()))?;
            if committed != component {
                mismatches.push(file);
            }
        } else {
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            std::fs::write(&dest, &component)
                .map_err(|e| format!("writing {}: {e}", dest.display()))?;
            eprintln!(
                "xtask: wrote {} ({} bytes)",
                dest.display(),
                component.len()
            );
        }
    }
    let manifest_path = root.join(MANIFEST);
    if !check {
        std::fs::write(&manifest_path, manifest).map_err(|e| e.to_string())?;
        return Ok(());
    }
    if mismatches.is_empty() {
        eprintln!("xtask: committed components match their source byte for byte");
        return Ok(());
    }
    let committed_manifest = std::fs::read_to_string(&manifest_path).unwrap_or_default();
    let committed_toolchain = committed_manifest
        .lines()
        .find_map(|l| l.strip_prefix("toolchain = "))
        .unwrap_or("?");
    if committed_toolchain != tc.description {
        return Err(format!(
            "{mismatches:?} differ from a rebuild, but they were built with `{committed_toolchain}` and \
             this machine has `{}`: rebuild them with `cargo xtask guests` and commit",
            tc.description
        ));
    }
    Err(format!(
        "{mismatches:?} do not match their source: run `cargo xtask guests` and commit the result"
    ))
}
