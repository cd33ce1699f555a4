//! Builds guest crates into Ballot components.
//!
//! Shared by `cargo xtask guests` (the default components, reproducibly) and
//! `ballot policy build` (a user's policy crate). Two toolchains work:
//! rustup's `wasm32-unknown-unknown` target when it is installed, otherwise
//! Debian's `rustc-web` with `-Zbuild-std` and rustup's `rust-lld`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// The wasm target every guest is built for.
pub const TARGET: &str = "wasm32-unknown-unknown";

/// How this machine builds wasm.
pub struct Toolchain {
    /// For manifests and messages, e.g. `rustc 1.96.0 ...; build-std; rust-lld`.
    pub description: String,
    cargo: PathBuf,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Toolchain {
    /// Finds a toolchain. `remap` is the source root whose path is replaced
    /// by `/ballot` in the output (with the cargo home as `/cargo`), so the
    /// bytes do not depend on where the checkout lives.
    pub fn find(remap: &Path) -> Result<Toolchain, String> {
        let home = std::env::var("CARGO_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
            });
        let rustflags = format!(
            "--remap-path-prefix={}=/ballot --remap-path-prefix={}=/cargo",
            remap.display(),
            home.display()
        );
        let rustup_target = output(Command::new("rustup").args(["target", "list", "--installed"]))
            .is_some_and(|list| list.lines().any(|l| l.trim() == TARGET));
        if rustup_target {
            let version = output(Command::new("rustc").arg("-V")).unwrap_or_default();
            return Ok(Toolchain {
                description: format!("{version}; rustup target {TARGET}"),
                cargo: "cargo".into(),
                env: vec![("RUSTFLAGS".into(), rustflags)],
                args: Vec::new(),
            });
        }
        let debian_rustc = Path::new("/usr/bin/rustc");
        let debian_cargo = Path::new("/usr/bin/cargo");
        let sysroot = output(Command::new("rustc").args(["+stable", "--print", "sysroot"]))
            .or_else(|| output(Command::new("rustc").args(["--print", "sysroot"])));
        let lld = sysroot
            .map(|s| PathBuf::from(s).join("lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld"));
        match (
            debian_rustc.exists() && debian_cargo.exists(),
            lld.filter(|p| p.exists()),
        ) {
            (true, Some(lld)) => {
                let version = output(Command::new(debian_rustc).arg("-V")).unwrap_or_default();
                Ok(Toolchain {
                    description: format!("{version}; build-std; rust-lld"),
                    cargo: debian_cargo.into(),
                    env: vec![
                        ("RUSTC_BOOTSTRAP".into(), "1".into()),
                        ("RUSTC".into(), debian_rustc.display().to_string()),
                        (
                            "CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER".into(),
                            lld.display().to_string(),
                        ),
                        ("RUSTFLAGS".into(), rustflags),
                    ],
                    args: vec!["-Zbuild-std=std,panic_abort".into()],
                })
            }
            _ => Err(format!(
                "no wasm toolchain: install rustup's {TARGET} target, or Debian's rustc-web \
                 (`apt-get install -y rustc-web cargo-web rust-web-src`)"
            )),
        }
    }

    /// `cargo build --target wasm32-unknown-unknown` with this toolchain's
    /// environment; the caller adds the profile, packages and directories.
    pub fn build_command(&self) -> Command {
        let mut cmd = Command::new(&self.cargo);
        // A rustup proxy's choice must not leak into Debian's cargo.
        cmd.env_remove("RUSTUP_TOOLCHAIN").env_remove("CARGO");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.arg("build").args(&self.args).args(["--target", TARGET]);
        cmd
    }
}

/// Turns a core module built with wit-bindgen into a component. The result
/// imports only what the module's WIT world imports (no WASI adapter).
pub fn componentize(module: &[u8]) -> Result<Vec<u8>, String> {
    wit_component::ComponentEncoder::default()
        .module(module)
        .and_then(|e| e.validate(true).encode())
        .map_err(|e| format!("{e:?}"))
}

/// Lower-case hex SHA-256: a component's id.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Builds the policy crate at `dir` (release, size-optimised) and returns
/// the component's bytes and the path it was written to
/// (`DIR/target/ballot/<crate>.wasm`).
pub fn build_crate(dir: &Path) -> Result<(Vec<u8>, PathBuf), String> {
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let manifest = dir.join("Cargo.toml");
    if !manifest.exists() {
        return Err(format!("{} has no Cargo.toml", dir.display()));
    }
    let tc = Toolchain::find(&dir)?;
    let target_dir = dir.join("target/ballot");
    let mut cmd = tc.build_command();
    cmd.current_dir(&dir)
        .args(["--release", "--message-format=json-render-diagnostics"])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        .args([
            "--config",
            "profile.release.opt-level=\"s\"",
            "--config",
            "profile.release.lto=true",
            "--config",
            "profile.release.codegen-units=1",
            "--config",
            "profile.release.panic=\"abort\"",
            "--config",
            "profile.release.strip=\"debuginfo\"",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!("building {} with {}", dir.display(), tc.description);
    let out = cmd.output().map_err(|e| format!("running cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("the wasm build failed ({})", out.status));
    }
    // The cdylib artifact of the crate at `dir`.
    let mut module_path = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let ours = msg["manifest_path"]
            .as_str()
            .is_some_and(|p| Path::new(p) == manifest);
        if !ours {
            continue;
        }
        if let Some(files) = msg["filenames"].as_array() {
            module_path = files
                .iter()
                .filter_map(|f| f.as_str())
                .find(|f| f.ends_with(".wasm"))
                .map(PathBuf::from)
                .or(module_path);
        }
    }
    let module_path = module_path.ok_or(
        "the build produced no .wasm: the crate needs `crate-type = [\"cdylib\", \"rlib\"]` in [lib]",
    )?;
    let module = std::fs::read(&module_path)
        .map_err(|e| format!("reading {}: {e}", module_path.display()))?;
    let component = componentize(&module)
        .map_err(|e| format!("turning {} into a component: {e}", module_path.display()))?;
    let stem = module_path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("policy");
    let out_path = target_dir.join(format!("{stem}.wasm"));
    std::fs::write(&out_path, &component)
        .map_err(|e| format!("writing {}: {e}", out_path.display()))?;
    Ok((component, out_path))
}
