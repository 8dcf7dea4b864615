//! Deployments as documents: what a scope runs, versioned and immutable,
//! and which version each room gets while a rollout is under way.
//!
//! A *scope* is what one deployment governs: the operators' policy rules
//! (`policies`), or one tenant's filter chain (`filters/<tenant>`). Each
//! scope has its own versions, its own active version and its own rollback,
//! so a tenant changing its filters never rolls back an operator's policy,
//! nor the other way round.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::filter::OnFailure;

/// What one deployment governs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// The policy rules: operators only.
    Policies,
    /// One tenant's filter chain: that tenant or an operator.
    Filters(String),
}

impl Scope {
    /// The scope as stored and shown: `policies` or `filters/<tenant>`.
    pub fn key(&self) -> String {
        match self {
            Scope::Policies => "policies".into(),
            Scope::Filters(t) => format!("filters/{t}"),
        }
    }

    pub fn parse(key: &str) -> Option<Scope> {
        match key {
            "policies" => Some(Scope::Policies),
            _ => key
                .strip_prefix("filters/")
                .filter(|t| throng_wire::validate_room_name(t).is_ok())
                .map(|t| Scope::Filters(t.to_owned())),
        }
    }

    /// The tenant a filter scope belongs to.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Scope::Policies => None,
            Scope::Filters(t) => Some(t),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

fn star() -> String {
    "*".into()
}

fn open() -> OnFailure {
    OnFailure::Open
}

/// One policy rule: rooms matching `tenant`, `rooms` (and `class`, if
/// given) run `module` with `params`. The first matching rule wins; rooms
/// no rule matches run the built-in policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    #[serde(default = "star")]
    pub tenant: String,
    #[serde(default = "star")]
    pub rooms: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// `native`, `builtin:<name>` or `sha256:<hex>` of a stored module.
    pub module: String,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Policies fail open by default: the built-in policy stands in.
    #[serde(default = "open")]
    pub on_failure: OnFailure,
}

/// One filter of a tenant's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterUse {
    /// `builtin:<name>` or `sha256:<hex>` of a stored module.
    pub module: String,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Filters fail closed by default: moderation is never skipped unasked.
    #[serde(default)]
    pub on_failure: OnFailure,
}

/// What a deployment says, by scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spec {
    Policies(Vec<PolicyRule>),
    Filters(Vec<FilterUse>),
}

impl Spec {
    /// Every module reference in it, with the world it must be of.
    pub fn modules(&self) -> Vec<(&str, crate::control::World)> {
        use crate::control::World;
        match self {
            Spec::Policies(rules) => rules
                .iter()
                .filter(|r| r.module != "native")
                .map(|r| (r.module.as_str(), World::RoomPolicy))
                .collect(),
            Spec::Filters(chain) => chain
                .iter()
                .map(|f| (f.module.as_str(), World::MessageFilter))
                .collect(),
        }
    }
}

/// One immutable version of a scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub scope: String,
    pub version: u64,
    #[serde(flatten)]
    pub spec: Spec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub created_by: String,
    pub created_at_ms: u64,
}

/// Which version of a scope is in force: `version` on `percent` of rooms,
/// `base` on the rest (a gradual rollout), or `version` alone at 100.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    pub version: u64,
    pub percent: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<u64>,
    pub by: String,
    pub at_ms: u64,
}

impl Activation {
    /// The version `room` of `tenant` runs. A room's share point is a hash
    /// of the room, so it stays on one version while the share only grows,
    /// and every edge agrees.
    pub fn version_for(&self, tenant: &str, room: &str) -> u64 {
        match self.base {
            Some(base) if share_point(tenant, room) >= u32::from(self.percent) * 100 => base,
            _ => self.version,
        }
    }
}

/// Where a room falls in 0..10,000 (hundredths of a percent).
pub fn share_point(tenant: &str, room: &str) -> u32 {
    let mut h = Sha256::new();
    h.update(tenant.as_bytes());
    h.update([0]);
    h.update(room.as_bytes());
    let d = h.finalize();
    let n = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    (n % 10_000) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(percent: u8) -> Activation {
        Activation {
            version: 2,
            percent,
            base: Some(1),
            by: "t".into(),
            at_ms: 0,
        }
    }

    #[test]
    fn a_rollout_gives_its_share_of_rooms_the_new_version() {
        for percent in [0u8, 10, 25, 50, 90, 100] {
            let a = rollout(percent);
            let n = 10_000;
            let new = (0..n).filter(|i| a.version_for("t", &format!("room-{i}")) == 2).count();
            let want = n * usize::from(percent) / 100;
            assert!(new.abs_diff(want) <= n / 50, "{percent}%: {new} of {n} rooms");
        }
    }

    #[test]
    fn widening_a_rollout_never_moves_a_room_back() {
        let rooms: Vec<String> = (0..2_000).map(|i| format!("r{i}")).collect();
        let mut before: Vec<u64> = rooms.iter().map(|r| rollout(0).version_for("t", r)).collect();
        for p in [5u8, 20, 40, 41, 80, 100] {
            let now: Vec<u64> = rooms.iter().map(|r| rollout(p).version_for("t", r)).collect();
            for (b, n) in before.iter().zip(&now) {
                assert!(!(*b == 2 && *n == 1), "a room went back to the old version at {p}%");
            }
            before = now;
        }
    }

    #[test]
    fn scopes_round_trip_and_refuse_bad_tenants() {
        assert_eq!(Scope::parse("policies"), Some(Scope::Policies));
        assert_eq!(Scope::parse("filters/acme"), Some(Scope::Filters("acme".into())));
        assert_eq!(Scope::parse("filters/"), None);
        assert_eq!(Scope::parse("filters/a b"), None);
        assert_eq!(Scope::parse("other"), None);
        assert_eq!(Scope::Filters("acme".into()).key(), "filters/acme");
    }

    #[test]
    fn deployment_json_is_flat_and_strict() {
        let d: Spec =
            serde_json::from_str(r#"{"policies":[{"module":"native","params":{"cap_per_sec":"5"}}]}"#).expect("valid");
        let Spec::Policies(rules) = d else { panic!("policies") };
        assert_eq!(rules[0].tenant, "*");
        assert_eq!(rules[0].on_failure, OnFailure::Open);
        let bad = serde_json::from_str::<Spec>(r#"{"policies":[{"module":"native","bogus":1}]}"#);
        assert!(bad.is_err());
        let f: Spec = serde_json::from_str(r#"{"filters":[{"module":"builtin:filter-keywords"}]}"#).expect("valid");
        let Spec::Filters(chain) = f else { panic!("filters") };
        assert_eq!(chain[0].on_failure, OnFailure::Closed);
    }
}
