//! Protocol swaps on this replica and across the cluster: following the
//! configured protocol, readiness answers, `activate`, the automatic
//! rollback after traps, and `rollback`.

use std::sync::Arc;
use std::time::Duration;

use ballot_control::activation::{
    self, Outcome as Decision, Poll, Readiness, Swap, Verdict, TRAPS_TO_ROLL_BACK, TRAP_WINDOW_MS,
};
use ballot_core::register::Command;
use ballot_core::{Consistency, Outcome};
use tracing::{debug, warn};

use super::config::{ClusterConfig, Kind};
use super::inspect::{compatible, component_view, wasm_factory};
use super::{now_ms, set_protocol_info, Registry, RegistryError, Running, SYSTEM_PREFIX};
use crate::node::{Control, CoreEvent, ProtocolFactory};
use crate::runtime;
use crate::system::mono_ms;
use ballot_client::views::ComponentView;

fn ready_key(nonce: u64, replica: u32) -> Vec<u8> {
    let mut key = SYSTEM_PREFIX.to_vec();
    key.extend_from_slice(format!("ready/{nonce}/{replica}").as_bytes());
    key
}

impl Registry {
    /// Answers a pending activation's readiness check, deletes answers to
    /// activations that are over, and swaps to the active protocol if this
    /// replica does not run it yet: what to do is the `Follower`'s
    /// decision, this does it.
    pub(super) async fn follow_protocol(&self, config: &ClusterConfig) {
        let follow = self
            .protocol
            .lock()
            .expect("registry lock")
            .follower
            .follow(config, &self.embedded_id);
        self.forget_readiness(follow.forget).await;
        if let Some(p) = follow.answer {
            let verdict = match self.prepare_protocol(p.target.as_deref()).await {
                Ok((label, view, _)) => {
                    let running = self.running();
                    match compatible(&running.view, &view) {
                        Ok(()) => {
                            self.protocol
                                .lock()
                                .expect("registry lock")
                                .views
                                .insert(label, view);
                            Verdict::Ready
                        }
                        Err(e) => Verdict::Refused(e),
                    }
                }
                Err(e) => Verdict::Refused(e),
            };
            let key = ready_key(p.nonce, self.core_config.self_id);
            let value = verdict.encode();
            if let Err(e) = self.command(key, Command::Put(value)).await {
                warn!("reporting readiness for activation {}: {e}", p.nonce);
            }
        }
        let Some(target) = follow.swap else {
            return;
        };
        if self.runtime.is_none() {
            return;
        }
        match self
            .prepare_protocol(config.protocol.active.as_deref())
            .await
        {
            Ok((label, view, factory)) => {
                let mut state = self.protocol.lock().expect("registry lock");
                state.views.insert(label.clone(), view);
                state.follower.swapping(&label);
                self.control.send(Control::Swap { label, factory });
            }
            Err(e) => warn!(component = %target, "cannot run the active protocol: {e}"),
        }
    }

    /// Fetches, compiles and instantiates a protocol component (`None`:
    /// the embedded one) for this replica; its id, description and factory.
    async fn prepare_protocol(
        &self,
        target: Option<&str>,
    ) -> Result<(String, ComponentView, ProtocolFactory), String> {
        let runtime = self.runtime.as_ref().ok_or_else(|| {
            format!(
                "replica {} runs the compiled-in protocol (--core native) and cannot run components",
                self.core_config.self_id
            )
        })?;
        let (label, component) = match target {
            None => (
                self.embedded_id.clone(),
                runtime.protocol_component().clone(),
            ),
            Some(id) => (
                id.to_string(),
                self.component(id).await.map_err(|e| e.to_string())?,
            ),
        };
        let rt = Arc::new(runtime::Runtime::from_parts(
            self.engine.clone(),
            component,
            runtime.policy_component().clone(),
        ));
        let config = self.core_config.clone();
        let probe = rt.clone();
        let info = tokio::task::spawn_blocking(move || {
            probe.replica(config).and_then(|mut core| core.describe())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| {
            format!(
                "it does not start on replica {}: {e}",
                self.core_config.self_id
            )
        })?;
        let factory = wasm_factory(
            rt,
            self.core_config.clone(),
            self.metrics.policy_failures.clone(),
        );
        Ok((label, component_view(info), factory))
    }

    pub(super) async fn on_core_event(&self, event: CoreEvent) {
        match event {
            CoreEvent::Swapped {
                label, incarnation, ..
            } => {
                let view = {
                    let mut state = self.protocol.lock().expect("registry lock");
                    state.traps.swapped(mono_ms());
                    state.views.get(&label).cloned()
                };
                let mut running = self.running.write().expect("registry lock");
                let before = running.clone();
                *running = Running {
                    view: view.unwrap_or_else(|| before.view.clone()),
                    label,
                    incarnation,
                    since_ms: now_ms(),
                };
                set_protocol_info(&self.metrics, Some(&before), &running);
                drop(running);
                self.changed.notify_waiters();
            }
            CoreEvent::Trapped {
                label,
                reason,
                count,
            } => {
                let fall_back = {
                    let mut state = self.protocol.lock().expect("registry lock");
                    let now = mono_ms();
                    // Past the rollback threshold, more traps at the same
                    // moment decide nothing more.
                    let traps =
                        (count as usize).min(ballot_control::activation::TRAPS_TO_ROLL_BACK);
                    (0..traps).fold(false, |any, _| state.traps.trapped(now) || any)
                };
                let config = self.applied().config;
                let active = config
                    .protocol
                    .active
                    .clone()
                    .unwrap_or_else(|| self.embedded_id.clone());
                if !fall_back || active != label {
                    return;
                }
                let Some(previous) = config.protocol.previous.last().cloned() else {
                    return;
                };
                warn!(component = %label, "the protocol keeps failing right after its activation; rolling back: {reason}");
                self.protocol
                    .lock()
                    .expect("registry lock")
                    .follower
                    .quarantine(&label);
                // Locally first: the failing protocol cannot be trusted to
                // carry the rollback through consensus.
                match self.prepare_protocol(previous.as_deref()).await {
                    Ok((to, view, factory)) => {
                        let mut state = self.protocol.lock().expect("registry lock");
                        state.views.insert(to.clone(), view);
                        state.follower.swapping(&to);
                        self.control.send(Control::Swap { label: to, factory });
                    }
                    Err(e) => {
                        warn!("cannot fall back to the previous protocol: {e}");
                        return;
                    }
                }
                // Then for everyone.
                let why = format!(
                    "trapped {TRAPS_TO_ROLL_BACK} times within {}s of its activation: {reason}",
                    TRAP_WINDOW_MS / 1000
                );
                for _ in 0..10 {
                    let result = self
                        .update(|config| {
                            Ok(activation::roll_back(
                                config,
                                &label,
                                &self.embedded_id,
                                &why,
                                self.core_config.self_id,
                                now_ms(),
                            ))
                        })
                        .await;
                    match result {
                        Ok(_) => return,
                        Err(e) => {
                            debug!("recording the automatic rollback: {e}");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
        }
    }

    /// Swaps the cluster to `target` (`None`: the embedded protocol) once
    /// every voter has said it can run it. With [`Swap::Activate`] the
    /// current protocol becomes the rollback target; with [`Swap::Rollback`]
    /// it is dropped from the rollback stack. Returns the configuration
    /// version and the target's id.
    pub async fn activate(
        &self,
        target: Option<&str>,
        action: Swap,
    ) -> Result<(u64, String), RegistryError> {
        let (version, config) = self.config().await?;
        let is_embedded = |id: &str| id.len() >= 8 && self.embedded_id.starts_with(id);
        let target = match target {
            None => None,
            Some(id) if is_embedded(id) => None,
            Some(id) => {
                let record = config.find(id).map_err(RegistryError::NotFound)?;
                if record.kind != Kind::Protocol {
                    return Err(RegistryError::Invalid(format!(
                        "component {} ({} {}) is a {}, not a protocol",
                        &record.id[..12],
                        record.name,
                        record.version,
                        record.kind
                    )));
                }
                (record.id != self.embedded_id).then(|| record.id.clone())
            }
        };
        let label = target.clone().unwrap_or_else(|| self.embedded_id.clone());
        if config.protocol.active == target {
            return Ok((version, label));
        }
        let nonce = now_ms();
        // Refused if another is being checked (against the record the
        // write replaces).
        self.update(|config| {
            activation::begin(config, target.clone(), action, nonce)
                .map_err(RegistryError::Unavailable)?;
            Ok(true)
        })
        .await?;

        // Every replica of the current membership, voter or learner, checks
        // it can run the component and says so (not the replicas listed at
        // start-up: some may have left, others joined since).
        let asked = (self.members)();
        let mut readiness = Readiness::new(asked.clone(), mono_ms());
        let decision = loop {
            match readiness.poll(mono_ms()) {
                Poll::Decided(d) => break d,
                Poll::Read(waiting) => {
                    for replica in waiting {
                        let answer = self
                            .read(ready_key(nonce, replica), Consistency::Linearizable)
                            .await
                            .ok()
                            .and_then(|c| c.value)
                            .and_then(|v| Verdict::decode(&v));
                        if let Some(v) = answer {
                            readiness.answer(replica, v);
                        }
                    }
                    if matches!(readiness.poll(mono_ms()), Poll::Read(_)) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        };
        let by = self.core_config.self_id;
        let (version, _) = self
            .update(|config| {
                activation::conclude(config, nonce, &target, action, &decision, by, now_ms())
                    .map_err(RegistryError::Unavailable)?;
                Ok(true)
            })
            .await?;
        // The answers served their purpose: none is read again.
        for replica in asked {
            if let Err(e) = self
                .command(ready_key(nonce, replica), Command::Delete)
                .await
            {
                debug!("deleting readiness {nonce}/{replica}: {e}");
            }
        }
        if let Decision::Refused(reason) = decision {
            return Err(RegistryError::Invalid(format!(
                "activation refused: {reason}"
            )));
        }
        Ok((version, label))
    }

    /// Deletes this replica's readiness answers to activations that are
    /// over: the activating replica deletes them too, but an answer can
    /// land after it gave up waiting. A delete that fails is tried again
    /// with the next configuration applied.
    async fn forget_readiness(&self, over: Vec<u64>) {
        for nonce in over {
            let key = ready_key(nonce, self.core_config.self_id);
            match self.command(key, Command::Delete).await {
                Ok(Outcome::Done(_)) => {
                    self.protocol
                        .lock()
                        .expect("registry lock")
                        .follower
                        .forgot(nonce);
                }
                Ok(other) => debug!("deleting readiness {nonce}: {other:?}"),
                Err(e) => debug!("deleting readiness {nonce}: {e}"),
            }
        }
    }

    /// Returns the cluster to the protocol it ran before the current one.
    pub async fn rollback(&self) -> Result<(u64, String), RegistryError> {
        let (_, config) = self.config().await?;
        let Some(previous) = config.protocol.previous.last().cloned() else {
            return Err(RegistryError::Invalid(
                "nothing to roll back to: the cluster runs the protocol it started with".into(),
            ));
        };
        self.activate(previous.as_deref(), Swap::Rollback).await
    }

    /// Waits until this replica's protocol instance runs `label`.
    pub async fn wait_running(&self, label: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if self.running().label == label {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.running().label == label;
            }
        }
    }
}
