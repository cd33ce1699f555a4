//! Builds Ballot's default guest components and checks the committed ones.
//!
//! ```text
//! cargo xtask guests          # rebuild host/components/*.wasm from guest/
//! cargo xtask guests --check  # rebuild into target/ and compare with the committed files
//! ```
//!
//! The host embeds the committed components, so a plain `cargo build` needs
//! no wasm toolchain. This task needs one: rustup's `wasm32-unknown-unknown`
//! target when it is installed, otherwise Debian's `rustc-web` with
//! `-Zbuild-std` (see `docs/design.md`, "Building the guests").

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use sha2::{Digest, Sha256};

/// (crate, artifact stem, committed file name)
const GUESTS: [(&str, &str, &str); 2] = [
    (
        "ballot-guest-protocol",
        "ballot_guest_protocol",
        "protocol.wasm",
    ),
    (
        "ballot-guest-register",
        "ballot_guest_register",
        "register.wasm",
    ),
];
const TARGET: &str = "wasm32-unknown-unknown";

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

/// How this machine builds wasm: a description for the manifest, and the
/// cargo command to run.
struct Toolchain {
    description: String,
    cargo: Command,
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn toolchain(root: &Path) -> Result<Toolchain, String> {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    // Paths end up in panic messages; remap them so the bytes do not depend
    // on where the checkout or the cargo cache lives.
    let rustflags = format!(
        "--remap-path-prefix={}=/ballot --remap-path-prefix={}=/cargo",
        root.display(),
        home.display()
    );
    let rustup_target = output(Command::new("rustup").args(["target", "list", "--installed"]))
        .is_some_and(|list| list.lines().any(|l| l.trim() == TARGET));
    if rustup_target {
        let version = output(Command::new("rustc").arg("-V")).unwrap_or_default();
        let mut cargo = Command::new("cargo");
        cargo.env("RUSTFLAGS", rustflags);
        return Ok(Toolchain {
            description: format!("{version}; rustup target {TARGET}"),
            cargo,
        });
    }
    let debian_rustc = Path::new("/usr/bin/rustc");
    let debian_cargo = Path::new("/usr/bin/cargo");
    let sysroot = output(Command::new("rustc").args(["+stable", "--print", "sysroot"]))
        .or_else(|| output(Command::new("rustc").args(["--print", "sysroot"])));
    let lld =
        sysroot.map(|s| PathBuf::from(s).join("lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld"));
    match (
        debian_rustc.exists() && debian_cargo.exists(),
        lld.filter(|p| p.exists()),
    ) {
        (true, Some(lld)) => {
            let version = output(Command::new(debian_rustc).arg("-V")).unwrap_or_default();
            let mut cargo = Command::new(debian_cargo);
            cargo
                .env("RUSTC_BOOTSTRAP", "1")
                .env("RUSTC", debian_rustc)
                .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER", lld)
                .env("RUSTFLAGS", rustflags)
                .arg("-Zbuild-std=std,panic_abort");
            Ok(Toolchain {
                description: format!("{version}; build-std; rust-lld"),
                cargo,
            })
        }
        _ => Err(format!(
            "no wasm toolchain: install rustup's {TARGET} target, or Debian's rustc-web \
             (`apt-get install -y rustc-web cargo-web rust-web-src`, as .ci/run does)"
        )),
    }
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn build(check: bool) -> Result<(), String> {
    let root = workspace();
    let tc = toolchain(&root)?;
    let target_dir = root.join("target/guest");
    let mut cmd = tc.cargo;
    cmd.current_dir(&root)
        // Keep the guests' build away from the host's: different flags.
        .args([
            "build",
            "--profile",
            "guest",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    for (krate, _, _) in GUESTS {
        cmd.args(["-p", krate]);
    }
    eprintln!("xtask: building guests with {}", tc.description);
    let status = cmd.status().map_err(|e| format!("running cargo: {e}"))?;
    if !status.success() {
        return Err(format!("guest build failed ({status})"));
    }

    let components = root.join("host/components");
    let mut manifest = format!("# Built by `cargo xtask guests`; checked by `cargo xtask guests --check`.\ntoolchain = {}\n", tc.description);
    let mut mismatches = Vec::new();
    for (_, stem, file) in GUESTS {
        let core = target_dir
            .join(TARGET)
            .join("guest")
            .join(format!("{stem}.wasm"));
        let module =
            std::fs::read(&core).map_err(|e| format!("reading {}: {e}", core.display()))?;
        let component = wit_component::ComponentEncoder::default()
            .module(&module)
            .and_then(|e| e.validate(true).encode())
            .map_err(|e| format!("encoding {file} as a component: {e:?}"))?;
        manifest.push_str(&format!("{file} = {}\n", sha256(&component)));
        let dest = components.join(file);
        if check {
            let committed =
                std::fs::read(&dest).map_err(|e| format!("reading {}: {e}", dest.display()))?;
            if committed != component {
                mismatches.push(file);
            }
        } else {
            std::fs::create_dir_all(&components).map_err(|e| e.to_string())?;
            std::fs::write(&dest, &component)
                .map_err(|e| format!("writing {}: {e}", dest.display()))?;
            eprintln!(
                "xtask: wrote {} ({} bytes)",
                dest.display(),
                component.len()
            );
        }
    }
    let manifest_path = components.join("MANIFEST");
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
