//! What clients change in the registry (push, bind, unbind) through the
//! configuration's compare-and-swap, and how a replica fetches and compiles
//! stored components.

use std::time::Duration;

use ballot_core::register::Command;
use ballot_core::{Consistency, Outcome};
use wasmtime::component::Component;

use super::config::{
    check_prefix, component_id, component_key, Binding, ClusterConfig, ComponentRecord, Kind,
};
use super::inspect::inspect;
use super::{now_ms, unavailable, Registry, RegistryError, CALL_TIMEOUT, CONFIG_KEY};
use crate::runtime::{Bound, PolicyInstance};
use crate::system_record::SystemRecord;

impl Registry {
    /// Compiles every bound policy of `config`.
    pub(super) async fn prepare(&self, config: &ClusterConfig) -> Result<Vec<Bound>, String> {
        let mut bound = Vec::new();
        for b in &config.bindings {
            let record = config
                .components
                .iter()
                .find(|c| c.id == b.component)
                .ok_or_else(|| format!("binding {:?} names an unlisted component", b.prefix))?;
            let component = self
                .component(&record.id)
                .await
                .map_err(|e| e.to_string())?;
            bound.push(Bound {
                prefix: b.prefix.as_bytes().to_vec(),
                id: record.id.clone(),
                instance: PolicyInstance::new(component, &record.name, &record.version),
            });
        }
        Ok(bound)
    }

    /// A stored component, compiled: from memory, the disk cache, or the
    /// cluster (this replica's copy, else a linearizable read, which also
    /// repairs the local copy).
    pub(super) async fn component(&self, id: &str) -> Result<Component, RegistryError> {
        if let Some(c) = self.compiled.lock().expect("registry lock").get(id) {
            return Ok(c.clone());
        }
        let key = component_key(id);
        let mut bytes = self.read(key.clone(), Consistency::Local).await?.value;
        if bytes.is_none() {
            bytes = self.read(key, Consistency::Linearizable).await?.value;
        }
        let bytes = bytes.ok_or_else(|| {
            RegistryError::NotFound(format!("component {id} is not stored in the cluster"))
        })?;
        if component_id(&bytes) != id {
            return Err(RegistryError::Invalid(format!(
                "the stored bytes of component {id} do not hash to its id"
            )));
        }
        let engine = self.engine.clone();
        let cache = self.cache.clone();
        let owned_id = id.to_string();
        let component = tokio::task::spawn_blocking(move || cache.load(&engine, &owned_id, &bytes))
            .await
            .map_err(|e| RegistryError::Unavailable(format!("compiling: {e}")))?
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        self.compiled
            .lock()
            .expect("registry lock")
            .insert(id.to_string(), component.clone());
        Ok(component)
    }

    /// Reads the configuration (linearizable), changes it with `edit` and
    /// writes it back if no one else changed it meanwhile; retries if
    /// someone did. Returns the version written.
    pub(super) async fn update(
        &self,
        edit: impl Fn(&mut ClusterConfig) -> Result<bool, RegistryError>,
    ) -> Result<(u64, ClusterConfig), RegistryError> {
        self.config_record()
            .update(|bytes| {
                let mut config = match bytes {
                    Some(v) => ClusterConfig::decode(v).map_err(RegistryError::Unavailable)?,
                    None => ClusterConfig::new(),
                };
                let next = edit(&mut config)?.then(|| config.encode());
                Ok((next, config))
            })
            .await
    }

    /// The configuration record, `\0ballot/config`.
    fn config_record(&self) -> SystemRecord<'_> {
        SystemRecord {
            requests: &self.requests,
            key: CONFIG_KEY,
            what: "the configuration",
            timeout: CALL_TIMEOUT,
        }
    }

    /// Validates a component, stores its bytes and lists it. Pushing the
    /// same bytes again changes nothing. Returns the record and whether it
    /// is new.
    pub async fn push(&self, bytes: Vec<u8>) -> Result<(ComponentRecord, bool), RegistryError> {
        let engine = self.engine.clone();
        let checked = bytes.clone();
        let (inspected, component) =
            tokio::task::spawn_blocking(move || inspect(&engine, &checked))
                .await
                .map_err(|e| RegistryError::Unavailable(format!("inspecting: {e}")))?
                .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let id = component_id(&bytes);
        let record = ComponentRecord {
            id: id.clone(),
            kind: inspected.kind,
            name: inspected.name,
            version: inspected.version,
            size: bytes.len() as u64,
            state_formats: inspected.state_formats,
            wire_formats: inspected.wire_formats,
            self_checked: inspected.self_checked,
            pushed_ms: now_ms(),
        };
        self.compiled
            .lock()
            .expect("registry lock")
            .insert(id.clone(), component);
        // The bytes first: a listed component is always fetchable.
        match self
            .command(component_key(&id), Command::Create(bytes))
            .await?
        {
            Outcome::Done(_) => {}
            other => return Err(unavailable(&other)),
        }
        // Set by the edit that lists it; an edit that finds it listed
        // already (pushed before, or by a racing push) leaves it false.
        let created = std::sync::atomic::AtomicBool::new(false);
        let (_, config) = self
            .update(|config| {
                let listed = config.components.iter().any(|c| c.id == record.id);
                created.store(!listed, std::sync::atomic::Ordering::Relaxed);
                if !listed {
                    config.components.push(record.clone());
                }
                Ok(!listed)
            })
            .await?;
        let stored = config
            .components
            .into_iter()
            .find(|c| c.id == id)
            .unwrap_or(record);
        Ok((stored, created.into_inner()))
    }

    /// Routes keys starting with `prefix` to the policy `component` (an id
    /// or a unique id prefix). Returns the configuration version that
    /// carries the binding.
    pub async fn bind(
        &self,
        prefix: &str,
        component: &str,
    ) -> Result<(u64, Binding, ComponentRecord), RegistryError> {
        check_prefix(prefix)?;
        let found = std::sync::Mutex::new(None);
        let (version, _) = self
            .update(|config| {
                let record = config.find(component).map_err(RegistryError::NotFound)?;
                if record.kind != Kind::Policy {
                    return Err(RegistryError::Invalid(format!(
                        "component {} ({} {}) is a {}, not a policy; only policies can be bound",
                        &record.id[..12],
                        record.name,
                        record.version,
                        record.kind
                    )));
                }
                let record = record.clone();
                let binding = Binding {
                    prefix: prefix.to_string(),
                    component: record.id.clone(),
                    bound_ms: now_ms(),
                };
                *found.lock().expect("local lock") = Some((binding.clone(), record.clone()));
                let existing = config.bindings.iter_mut().find(|b| b.prefix == prefix);
                match existing {
                    Some(b) if b.component == record.id => return Ok(false),
                    Some(b) => *b = binding,
                    None => config.bindings.push(binding),
                }
                config.bindings.sort_by(|a, b| a.prefix.cmp(&b.prefix));
                Ok(true)
            })
            .await?;
        // Make sure this replica can run it before saying it is bound.
        let (binding, record) = found
            .into_inner()
            .expect("local lock")
            .expect("set by a successful edit");
        self.component(&record.id).await?;
        Ok((version, binding, record))
    }

    /// Removes the binding of `prefix`; its keys go back to the register.
    pub async fn unbind(&self, prefix: &str) -> Result<u64, RegistryError> {
        let (version, _) = self
            .update(|config| {
                let before = config.bindings.len();
                config.bindings.retain(|b| b.prefix != prefix);
                if config.bindings.len() == before {
                    return Err(RegistryError::NotFound(format!(
                        "no binding for prefix {prefix:?}"
                    )));
                }
                Ok(true)
            })
            .await?;
        Ok(version)
    }

    /// The cluster's configuration, read linearizably.
    pub async fn config(&self) -> Result<(u64, ClusterConfig), RegistryError> {
        self.update(|_| Ok(false)).await
    }

    /// Waits until this replica runs configuration `version` or newer.
    pub async fn wait_applied(&self, version: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if self.applied().version >= version {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.applied().version >= version;
            }
        }
    }
}
