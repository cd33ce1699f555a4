//! `ballot policy new` and `ballot policy build`: a policy crate scaffold,
//! and building one into a component checked as a push would check it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::output::fail;

/// `ballot policy build [DIR]`.
pub fn build(dir: PathBuf) -> ExitCode {
    match ballot_guest_build::build_crate(&dir) {
        Ok((component, path)) => {
            let engine = match crate::runtime::engine() {
                Ok(e) => e,
                Err(e) => return fail(e),
            };
            // The same checks `component push` makes, before the user pushes.
            match crate::registry::inspect(&engine, &component) {
                Ok((i, _)) => {
                    println!(
                        "wrote {} ({} bytes): {} {} {}{}",
                        path.display(),
                        component.len(),
                        i.kind,
                        i.name,
                        i.version,
                        if i.self_checked {
                            ", self-check passed"
                        } else {
                            ""
                        }
                    );
                    println!("id {}", crate::registry::component_id(&component));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format!(
                    "{} was built but would be refused: {e}",
                    path.display()
                )),
            }
        }
        Err(e) => fail(e),
    }
}

/// Where the SDK is: `--sdk`, `BALLOT_SDK`, or this build's own checkout.
fn sdk_path(given: Option<PathBuf>) -> Result<PathBuf, String> {
    let candidate =
        given.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/sdk"));
    candidate
        .join("Cargo.toml")
        .exists()
        .then(|| candidate.canonicalize().unwrap_or(candidate.clone()))
        .ok_or_else(|| {
            format!(
                "the policy SDK is not at {}: give --sdk PATH/guest/sdk of a Ballot checkout",
                candidate.display()
            )
        })
}

fn camel(name: &str) -> String {
    name.split(['-', '_'])
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The files of a new policy crate.
pub fn scaffold_files(name: &str, sdk: &Path) -> Vec<(&'static str, String)> {
    let ty = camel(name);
    let sdk = sdk.display().to_string().replace('\\', "/");
    vec![
        (
            "Cargo.toml",
            format!(
                r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
# cdylib: the wasm component; rlib: native tests.
crate-type = ["cdylib", "rlib"]

[dependencies]
ballot-policy = {{ path = "{sdk}" }}

# A crate of its own, even inside another workspace.
[workspace]
"#
            ),
        ),
        (
            "src/lib.rs",
            format!(
                r#"//! {name}: a Ballot policy.
//!
//! Starts as an append-only log: each command is one line appended to the
//! value, and a log that would grow past 64 KiB refuses the command. Change
//! `apply` to your own rules; `cargo test` runs the tests natively.
//!
//! ```text
//! ballot policy build .                 # target/ballot/{lib}.wasm
//! ballot component push target/ballot/{lib}.wasm
//! ballot policy bind logs/ <id>
//! ballot kv apply logs/today "first line"
//! ```

use ballot_policy::{{Change, Context, Current, Policy, Rejection}};

pub struct {ty};

/// Largest value the policy writes.
pub const SIZE_MAX: usize = 64 * 1024;

impl Policy for {ty} {{
    const NAME: &'static str = "{name}";
    const VERSION: &'static str = "0.1.0";

    fn apply(_ctx: &Context, current: &Current, command: &[u8]) -> Result<Change, Rejection> {{
        if command.contains(&b'\n') {{
            return Err(Rejection::invalid("one line per command"));
        }}
        let mut log = current.value.clone().unwrap_or_default();
        if log.len() + command.len() + 1 > SIZE_MAX {{
            return Err(Rejection::conflict(format!("the log is full ({{SIZE_MAX}} bytes)")));
        }}
        log.extend_from_slice(command);
        log.push(b'\n');
        Ok(Change::Set(log))
    }}

    fn self_check() -> Result<(), String> {{
        let mut key = ballot_policy::testing::Key::<{ty}>::new("self-check");
        key.apply("a").map_err(|r| r.message)?;
        key.apply("b").map_err(|r| r.message)?;
        match key.text() {{
            Some("a\nb\n") => Ok(()),
            other => Err(format!("two appends gave {{other:?}}")),
        }}
    }}
}}

ballot_policy::export_policy!({ty});

#[cfg(test)]
mod tests {{
    use super::*;
    use ballot_policy::testing::Key;

    #[test]
    fn lines_append_in_order() {{
        let mut key = Key::<{ty}>::new("logs/today");
        key.apply("first").unwrap();
        key.apply("second").unwrap();
        assert_eq!(key.text(), Some("first\nsecond\n"));
        assert_eq!(key.version(), 2);
    }}

    #[test]
    fn a_full_log_refuses_more() {{
        let mut key = Key::<{ty}>::new("logs/today");
        let line = "x".repeat(1023);
        for _ in 0..64 {{
            key.apply(&line).unwrap();
        }}
        assert_eq!(key.apply("one more").unwrap_err().code, "conflict");
        assert_eq!(key.version(), 64);
    }}

    #[test]
    fn self_check_passes() {{
        {ty}::self_check().unwrap();
    }}
}}
"#,
                lib = name.replace('-', "_")
            ),
        ),
        (
            "README.md",
            format!(
                r#"# {name}

A Ballot policy. `src/lib.rs` is all of it.

    cargo test                      # the policy's tests, natively
    ballot policy build .           # the component: target/ballot/{lib}.wasm
    ballot component push target/ballot/{lib}.wasm
    ballot policy bind PREFIX ID    # keys starting with PREFIX use it
    ballot kv apply KEY COMMAND     # POST /v1/kv/KEY with COMMAND as the body

A policy must be a pure function of its arguments: any replica may run it,
and more than once. The time comes from the host in `Context::now_ms`.
"#,
                lib = name.replace('-', "_")
            ),
        ),
        (".gitignore", "target/\n".to_string()),
    ]
}

/// `ballot policy new PATH`: like `cargo new`, the policy is named after
/// the path's last component unless `--dir` names the directory apart.
pub fn new(path: String, dir: Option<PathBuf>, sdk: Option<PathBuf>) -> ExitCode {
    let (name, dir) = match dir {
        Some(dir) => (path, Some(dir)),
        None => {
            let p = PathBuf::from(&path);
            let Some(name) = p.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                return fail(format!("{path:?}: name the policy's directory"));
            };
            (name, Some(p))
        }
    };
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        return fail(format!(
            "{name:?}: a policy name is lower-case letters, digits, - and _, starting with a letter"
        ));
    }
    let sdk = match sdk_path(sdk.or_else(|| std::env::var_os("BALLOT_SDK").map(PathBuf::from))) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
    if dir.exists() && std::fs::read_dir(&dir).map_or(true, |mut d| d.next().is_some()) {
        return fail(format!("{} exists and is not empty", dir.display()));
    }
    for (file, text) in scaffold_files(&name, &sdk) {
        let path = dir.join(file);
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, text));
        if let Err(e) = written {
            return fail(format!("{}: {e}", path.display()));
        }
    }
    println!("created {} (policy {name})", dir.display());
    println!(
        "  cd {} && cargo test && ballot policy build .",
        dir.display()
    );
    ExitCode::SUCCESS
}
