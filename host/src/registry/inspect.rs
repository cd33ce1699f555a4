//! What a component is before it is stored: [`inspect`] checks its worlds,
//! imports and self-check; [`Cache`] keeps compiled code per replica;
//! [`compatible`] says whether two protocols can run side by side.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wasmtime::component::Component;
use wasmtime::Engine;

use super::config::{component_id, Kind, COMPONENT_MAX};
use super::CONTRACT;
use crate::node::{Protocol, ProtocolFactory};
use crate::runtime::{self, Error, Runtime};
use ballot_client::views::ComponentView;

/// What [`inspect`] learned about a component.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inspected {
    pub kind: Kind,
    pub name: String,
    pub version: String,
    pub state_formats: Vec<u32>,
    pub wire_formats: Vec<u32>,
    pub self_checked: bool,
}

/// Splits `ns:pkg/iface@1.2.3` into the name and the version.
fn split_version(name: &str) -> (&str, Option<(u64, u64, u64)>) {
    let Some((base, version)) = name.split_once('@') else {
        return (name, None);
    };
    let mut parts = version.splitn(3, '.').map(|p| {
        // Pre-release or build suffixes make the version unsupported.
        p.parse::<u64>().ok()
    });
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Some(a)), Some(Some(b)), Some(Some(c))) => (base, Some((a, b, c))),
        _ => (base, Some((u64::MAX, 0, 0))),
    }
}

/// Whether a component built against `v` runs on this host: the same
/// 0.minor line (the component model's semver rule for 0.x), and for an
/// import no newer patch than the host's (it may use functions the host
/// does not have).
fn supported(v: Option<(u64, u64, u64)>, import: bool) -> bool {
    let (major, minor, patch) = CONTRACT;
    match v {
        Some((a, b, c)) => a == major && b == minor && (!import || c <= patch),
        None => false,
    }
}

fn contract() -> String {
    let (a, b, c) = CONTRACT;
    format!("ballot:core@{a}.{b}.{c}")
}

/// Checks a component before it is stored. Blocking: it compiles and runs
/// guest code (the self-check) under the sandbox's time and memory bounds.
pub fn inspect(engine: &Engine, bytes: &[u8]) -> Result<(Inspected, Component), Error> {
    let fail = Error::Compile;
    if bytes.len() > COMPONENT_MAX {
        return Err(fail(format!(
            "the file is {} bytes; components are at most {COMPONENT_MAX}",
            bytes.len()
        )));
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(fail(
            "not a WebAssembly file (it does not start with \\0asm)".into(),
        ));
    }
    match &bytes[4..8] {
        [0x0d, 0x00, 0x01, 0x00] => {}
        [0x01, 0x00, 0x00, 0x00] => {
            return Err(fail(
                "a core wasm module, not a component: `ballot policy build` (or \
                 wit-component) turns a module built with wit-bindgen into one"
                    .into(),
            ))
        }
        other => {
            return Err(fail(format!(
                "an unknown WebAssembly version or layer {other:02x?}"
            )))
        }
    }
    let component = Component::new(engine, bytes)
        .map_err(|e| fail(format!("the component does not compile: {e:#}")))?;
    let ty = component.component_type();

    let mut kind = None;
    let mut exports = Vec::new();
    for (name, _) in ty.exports(engine) {
        exports.push(name.to_string());
        let (base, version) = split_version(name);
        let this = match base {
            "ballot:core/policy-api" => Kind::Policy,
            "ballot:core/replica" => Kind::Protocol,
            _ => continue,
        };
        if !supported(version, false) {
            return Err(fail(format!(
                "it exports {name}, which this host does not run: it implements {}",
                contract()
            )));
        }
        if kind.is_some_and(|k| k != this) {
            return Err(fail(
                "it exports both the policy and the protocol interfaces; a component is one or the other"
                    .into(),
            ));
        }
        kind = Some(this);
    }
    let Some(kind) = kind else {
        return Err(fail(format!(
            "it implements neither the `policy` nor the `protocol` world of {} (it exports {})",
            contract(),
            if exports.is_empty() {
                "nothing".to_string()
            } else {
                exports.join(", ")
            }
        )));
    };
    for (name, _) in ty.imports(engine) {
        let (base, version) = split_version(name);
        let offered = match base {
            "ballot:core/log" => true,
            "ballot:core/policy-api" => kind == Kind::Protocol,
            _ => false,
        };
        if !offered {
            return Err(fail(format!(
                "it imports {name}, which the host does not offer to a {kind}: guests get \
                 no clock, randomness, files or network (only ballot:core/log{})",
                if kind == Kind::Protocol {
                    " and ballot:core/policy-api"
                } else {
                    ""
                }
            )));
        }
        if !supported(version, true) {
            return Err(fail(format!(
                "it imports {name}, newer than this host's {}",
                contract()
            )));
        }
    }

    let inspected = match kind {
        Kind::Policy => run_policy(engine, &component)?,
        Kind::Protocol => run_protocol(engine, &component)?,
    };
    Ok((inspected, component))
}

/// Longest policy name or version a component may describe itself with.
const DESCRIBE_MAX: usize = 128;

fn run_policy(engine: &Engine, component: &Component) -> Result<Inspected, Error> {
    let (mut store, instance) = runtime::sandbox_policy(engine, component)?;
    let (name, version) = runtime::describe_policy(&mut store, &instance)
        .map_err(|e| Error::Refused(format!("its describe failed: {e}")))?;
    // Names go into records, listings and every failure message.
    if name.is_empty() || name.len() > DESCRIBE_MAX || version.len() > DESCRIBE_MAX {
        return Err(Error::Refused(format!(
            "its describe returned a name of {} bytes and a version of {}; each is at most \
             {DESCRIBE_MAX} bytes and the name is not empty",
            name.len(),
            version.len()
        )));
    }
    let self_checked = runtime::self_check_policy(&mut store, &instance)?;
    Ok(Inspected {
        kind: Kind::Policy,
        name,
        version,
        state_formats: Vec::new(),
        wire_formats: Vec::new(),
        self_checked,
    })
}

fn run_protocol(engine: &Engine, component: &Component) -> Result<Inspected, Error> {
    let register = Component::new(engine, runtime::REGISTER_WASM)
        .map_err(|e| Error::Compile(format!("compiling the register policy: {e:#}")))?;
    let rt = runtime::Runtime::from_parts(engine.clone(), component.clone(), register);
    let mut core = rt.replica(ballot_core::Config::new(1, 1, vec![1]))?;
    let info = core.describe()?;
    let self_checked = core.self_check()?;
    Ok(Inspected {
        kind: Kind::Protocol,
        name: info.name,
        version: info.version,
        state_formats: info.state_formats,
        wire_formats: info.wire_formats,
        self_checked,
    })
}

/// Compiled components on disk, for this engine only.
#[derive(Clone)]
pub struct Cache {
    dir: PathBuf,
    engine_tag: u64,
}

impl Cache {
    pub fn new(data_dir: &Path, engine: &Engine) -> Cache {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Cache {
            dir: data_dir.join("compiled"),
            engine_tag: h.finish(),
        }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir
            .join(format!("{id}-{:016x}.cwasm", self.engine_tag))
    }

    /// Puts compiled code at `path` whole or not at all: the bytes are on
    /// disk before the name points at them. The cache is loaded without
    /// re-verification, so a file left half written by a crash between the
    /// rename and the page cache's flush must never be seen.
    fn store(&self, path: &Path, serialized: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        std::fs::create_dir_all(&self.dir)?;
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(serialized)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// The compiled component, from the cache or by compiling `bytes` (and
    /// caching the result). `bytes` must already match `id`.
    pub fn load(&self, engine: &Engine, id: &str, bytes: &[u8]) -> Result<Component, Error> {
        let path = self.path(id);
        if path.exists() {
            // SAFETY: only this daemon writes into `compiled/`, with
            // `Component::serialize` of this engine configuration (the file
            // name carries the engine's compatibility hash, and wasmtime
            // checks it again).
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "recompiling: {e:#}");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let component = Component::new(engine, bytes)
            .map_err(|e| Error::Compile(format!("compiling component {id}: {e:#}")))?;
        if let Ok(serialized) = component.serialize() {
            if let Err(e) = self.store(&path, &serialized) {
                tracing::warn!(path = %path.display(), "not caching compiled code: {e}");
            }
        }
        Ok(component)
    }
}

/// Whether replicas running `from` and `to` side by side (as they do while
/// a swap is under way) understand each other, and whether `to` reads the
/// key states `from` wrote. Both lists end with the format written.
pub fn compatible(from: &ComponentView, to: &ComponentView) -> Result<(), String> {
    let writes = |f: &[u32]| f.last().copied();
    let (Some(from_wire), Some(to_wire), Some(from_state)) = (
        writes(&from.wire_formats),
        writes(&to.wire_formats),
        writes(&from.state_formats),
    ) else {
        return Err("a protocol must declare the state and wire formats it reads".into());
    };
    if !to.wire_formats.contains(&from_wire) {
        return Err(format!(
            "{} {} cannot read wire format {from_wire}, which {} {} sends while the swap is under way",
            to.name, to.version, from.name, from.version
        ));
    }
    if !from.wire_formats.contains(&to_wire) {
        return Err(format!(
            "{} {} cannot read wire format {to_wire}, which {} {} would send while the swap is under way; \
             first activate a version that reads it",
            from.name, from.version, to.name, to.version
        ));
    }
    if !to.state_formats.contains(&from_state) {
        return Err(format!(
            "{} {} cannot read key-state format {from_state}, which {} {} wrote",
            to.name, to.version, from.name, from.version
        ));
    }
    Ok(())
}

/// Builds instances of `runtime`'s protocol for this replica.
pub fn wasm_factory(
    runtime: Arc<Runtime>,
    base: ballot_core::Config,
    failures: prometheus_client::metrics::counter::Counter,
) -> ProtocolFactory {
    Arc::new(move |incarnation| {
        let mut config = base.clone();
        config.incarnation = incarnation;
        let mut core = runtime.replica(config).map_err(|e| e.to_string())?;
        core.policies_mut().count_failures(failures.clone());
        Ok(Box::new(core) as Box<dyn Protocol>)
    })
}

/// What the API shows of a component's own description.
pub fn component_view(info: ballot_core::Info) -> ComponentView {
    ComponentView {
        name: info.name,
        version: info.version,
        state_formats: info.state_formats,
        wire_formats: info.wire_formats,
    }
}

/// One line per embedded component: its world, name, version and formats.
pub fn describe_embedded() -> Result<Vec<Embedded>, Error> {
    let engine = runtime::engine()?;
    let mut out = Vec::new();
    for (bytes, file) in [
        (runtime::PROTOCOL_WASM, "protocol.wasm"),
        (runtime::REGISTER_WASM, "register.wasm"),
    ] {
        let (i, _) = inspect(&engine, bytes)?;
        let protocol = i.kind == Kind::Protocol;
        out.push(Embedded {
            kind: i.kind.to_string(),
            name: i.name,
            version: i.version,
            file,
            bytes: bytes.len(),
            id: component_id(bytes),
            state_formats: if protocol {
                i.state_formats
            } else {
                Vec::new()
            },
            wire_formats: if protocol { i.wire_formats } else { Vec::new() },
        });
    }
    Ok(out)
}

/// One embedded default component, as `ballot components` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Embedded {
    pub kind: String,
    pub name: String,
    pub version: String,
    pub file: &'static str,
    pub bytes: usize,
    pub id: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub state_formats: Vec<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub wire_formats: Vec<u32>,
}

impl Embedded {
    /// One line for people.
    pub fn line(&self) -> String {
        let formats = if self.state_formats.is_empty() {
            String::new()
        } else {
            format!(
                "  state formats {:?}  wire formats {:?}",
                self.state_formats, self.wire_formats
            )
        };
        format!(
            "{:<9} {} {}{formats}  ({}, {} bytes, {})",
            self.kind,
            self.name,
            self.version,
            self.file,
            self.bytes,
            &self.id[..12]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_follow_the_component_model_semver_rules() {
        assert!(supported(split_version("ballot:core/log@0.2.0").1, true));
        assert!(supported(split_version("ballot:core/log@0.2.1").1, true));
        assert!(!supported(split_version("ballot:core/log@0.2.9").1, true));
        assert!(supported(
            split_version("ballot:core/policy-api@0.2.9").1,
            false
        ));
        assert!(!supported(
            split_version("ballot:core/policy-api@0.3.0").1,
            false
        ));
        assert!(!supported(
            split_version("ballot:core/policy-api@1.2.1").1,
            false
        ));
        assert!(!supported(split_version("ballot:core/policy-api").1, false));
        assert!(!supported(
            split_version("ballot:core/policy-api@0.2.1-rc1").1,
            false
        ));
    }

    #[test]
    fn embedded_components_pass_inspection() {
        let engine = runtime::engine().unwrap();
        let (p, _) = inspect(&engine, runtime::PROTOCOL_WASM).unwrap();
        assert_eq!(p.kind, Kind::Protocol);
        let (r, _) = inspect(&engine, runtime::REGISTER_WASM).unwrap();
        assert_eq!((r.kind, r.name.as_str()), (Kind::Policy, "register"));
    }

    #[test]
    fn broken_files_are_refused_with_the_reason() {
        let engine = runtime::engine().unwrap();
        let refuse = |bytes: &[u8]| inspect(&engine, bytes).err().unwrap().to_string();
        assert!(refuse(b"hello world").contains("not a WebAssembly file"));
        assert!(refuse(b"\0asm\x01\0\0\0").contains("core wasm module"));
        let half = &runtime::REGISTER_WASM[..runtime::REGISTER_WASM.len() / 2];
        assert!(refuse(half).contains("does not compile"));
    }

    #[test]
    fn the_compiled_cache_round_trips() {
        let dir = std::env::temp_dir().join(format!("ballot-cache-{}", std::process::id()));
        let engine = runtime::engine().unwrap();
        let cache = Cache::new(&dir, &engine);
        let id = "register";
        cache.load(&engine, id, runtime::REGISTER_WASM).unwrap();
        assert!(cache.path(id).exists());
        // From the cache this time: garbage bytes are never compiled.
        cache.load(&engine, id, b"not used").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
