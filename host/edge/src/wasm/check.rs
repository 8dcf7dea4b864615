//! The checks a module passes before the control plane accepts it, after
//! it compiled and matched its world: it instantiates within the limits,
//! its `configure` takes the given params, and a self-test call (a
//! synthetic tick for a policy, a synthetic batch for a filter) answers
//! validly within the call budget. Nothing here takes a pool place that a
//! room could want: the instances are dropped at once.

use std::sync::Arc;

use super::bindings::{Kind, Message, RoomStats};
use super::filter::{FilterLimits, FilterModule, validate as validate_verdicts};
use super::policy::{PolicyModule, validate as validate_plan};
use super::{WasmError, WasmRuntime, reason};
use crate::policy::InboundBatch;

/// Where a module's check stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStage {
    Instantiate,
    Configure,
    SelfTest,
}

impl CheckStage {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStage::Instantiate => "instantiate",
            CheckStage::Configure => "configure",
            CheckStage::SelfTest => "self_test",
        }
    }
}

/// A module that did not pass: the stage and why.
#[derive(Debug, Clone)]
pub struct CheckFailure {
    pub stage: CheckStage,
    pub reason: String,
}

fn fail(stage: CheckStage, reason: impl Into<String>) -> CheckFailure {
    CheckFailure {
        stage,
        reason: reason.into(),
    }
}

/// The self-test tick: a few messages of every kind, from three senders.
fn synthetic_inbound(now_ms: u64) -> InboundBatch {
    let mut inbound = InboundBatch::with_capacity(8);
    let kinds = [
        throng_wire::Kind::Chat,
        throng_wire::Kind::Chat,
        throng_wire::Kind::Like,
        throng_wire::Kind::Gift,
        throng_wire::Kind::Host,
        throng_wire::Kind::System,
        throng_wire::Kind::Chat,
        throng_wire::Kind::Like,
    ];
    for (i, kind) in kinds.into_iter().enumerate() {
        let gift = (kind == throng_wire::Kind::Gift).then_some("rose");
        inbound.push(i as u64 % 3, kind, 16, now_ms, gift);
    }
    inbound
}

impl WasmRuntime {
    /// Instantiates `module`, configures it with `params` and plans one
    /// synthetic tick under the call budget.
    pub async fn check_policy(
        &self,
        module: &Arc<PolicyModule>,
        params: Vec<(String, String)>,
    ) -> Result<(), CheckFailure> {
        let label: Arc<str> = Arc::from("check");
        let mut store = self.store(label, module.hash, params.clone(), self.settings.policy_memory_bytes);
        self.arm_instantiate(&mut store);
        let bindings = module
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| instantiate_failed(module.hash, &e))?;
        configured(bindings.call_configure(&mut store, &params).await)?;
        let inbound = synthetic_inbound(crate::unix_now_ms());
        let stats = RoomStats {
            tick: 1,
            tick_ms: 50,
            elapsed_ms: 50,
            online: 100,
        };
        self.arm(&mut store, 0);
        let plan = bindings
            .call_plan_tick(&mut store, stats, &inbound)
            .await
            .map_err(|e| fail(CheckStage::SelfTest, format!("plan-tick failed: {}", reason(&e))))?;
        validate_plan(&plan, inbound.len()).map_err(|r| fail(CheckStage::SelfTest, format!("invalid plan: {r}")))
    }

    /// Instantiates `module` within `limits`, configures it with `params`
    /// and judges one synthetic batch under the call budget.
    pub async fn check_filter(
        &self,
        module: &Arc<FilterModule>,
        params: Vec<(String, String)>,
        limits: FilterLimits,
    ) -> Result<(), CheckFailure> {
        let label: Arc<str> = Arc::from("check");
        let memory = limits.memory_bytes.min(self.settings.filter_memory_bytes);
        let mut store = self.store(label, module.hash, params.clone(), memory);
        self.arm_instantiate(&mut store);
        let bindings = module
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| instantiate_failed(module.hash, &e))?;
        configured(bindings.call_configure(&mut store, &params).await)?;
        // A filter carrying a language runtime may start up on its first
        // call: that one runs under the instantiation budget, as at load.
        let warm = [message("throng-self-test", Kind::Chat, b"warm-up")];
        bindings
            .call_filter(&mut store, &warm)
            .await
            .map_err(|e| fail(CheckStage::SelfTest, format!("warm-up call failed: {}", reason(&e))))?;
        let batch = [
            message("alice", Kind::Chat, b"hello, room"),
            message("bob", Kind::Like, b""),
            message("carol", Kind::Gift, b"rose"),
            message("host", Kind::Host, b"welcome"),
            message("dave", Kind::Chat, "\u{e9}t\u{e9} \u{1f600}".as_bytes()),
        ];
        self.arm_with(&mut store, batch.len(), Some(limits.call_budget));
        let verdicts = bindings
            .call_filter(&mut store, &batch)
            .await
            .map_err(|e| fail(CheckStage::SelfTest, format!("filter failed: {}", reason(&e))))?;
        validate_verdicts(&verdicts, batch.len()).map_err(|r| fail(CheckStage::SelfTest, r))
    }
}

fn instantiate_failed(hash: super::ModuleHash, e: &wasmtime::Error) -> CheckFailure {
    fail(
        CheckStage::Instantiate,
        WasmError::Instantiate {
            hash,
            reason: reason(e),
        }
        .to_string(),
    )
}

/// What `configure` answered, as a check.
fn configured(answer: wasmtime::Result<Result<(), String>>) -> Result<(), CheckFailure> {
    match answer {
        Ok(Ok(())) => Ok(()),
        Ok(Err(msg)) => Err(fail(
            CheckStage::Configure,
            format!("configure refused its params: {msg}"),
        )),
        Err(e) => Err(fail(CheckStage::Configure, format!("configure failed: {}", reason(&e)))),
    }
}

fn message(sender: &str, kind: Kind, body: &[u8]) -> Message {
    Message {
        sender: sender.into(),
        kind,
        body: body.to_vec(),
    }
}
