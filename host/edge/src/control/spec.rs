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

/// Which policy rule a rule-level change names: the rooms it selects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSelector {
    #[serde(default = "star")]
    pub tenant: String,
    #[serde(default = "star")]
    pub rooms: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
}

impl PolicyRule {
    fn selects(&self, s: &RuleSelector) -> bool {
        self.tenant == s.tenant && self.rooms == s.rooms && self.class == s.class
    }

    /// Whether this rule applies to `room` of `tenant` in class `class`.
    pub fn matches(&self, tenant: &str, room: &str, class: &str) -> bool {
        wildmatch::WildMatch::new(&self.tenant).matches(tenant)
            && wildmatch::WildMatch::new(&self.rooms).matches(room)
            && self.class.as_deref().is_none_or(|c| c == class)
    }
}

/// One change to a scope's active set, instead of a whole new set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Replaces the rule for the same tenant, rooms and class where it
    /// is, or else goes first: the first matching rule wins, and a rule
    /// added for some rooms is meant to take them.
    AddRule(PolicyRule),
    RemoveRule(RuleSelector),
    /// Replaces the filter of the same module where it is in the chain,
    /// or else runs last.
    AddFilter(FilterUse),
    RemoveFilter(String),
}

impl Spec {
    /// This set with `change` made; an error says why it cannot be.
    pub fn changed(&self, change: Change) -> Result<Spec, String> {
        match (self.clone(), change) {
            (Spec::Policies(mut rules), Change::AddRule(rule)) => {
                let at = RuleSelector {
                    tenant: rule.tenant.clone(),
                    rooms: rule.rooms.clone(),
                    class: rule.class.clone(),
                };
                match rules.iter_mut().find(|r| r.selects(&at)) {
                    Some(r) => *r = rule,
                    None => rules.insert(0, rule),
                }
                Ok(Spec::Policies(rules))
            }
            (Spec::Policies(mut rules), Change::RemoveRule(at)) => {
                let before = rules.len();
                rules.retain(|r| !r.selects(&at));
                if rules.len() == before {
                    return Err(format!(
                        "no rule for tenant `{}`, rooms `{}`{} in the active set",
                        at.tenant,
                        at.rooms,
                        at.class.map(|c| format!(", class `{c}`")).unwrap_or_default()
                    ));
                }
                Ok(Spec::Policies(rules))
            }
            (Spec::Filters(mut chain), Change::AddFilter(f)) => {
                match chain.iter_mut().find(|c| c.module == f.module) {
                    Some(c) => *c = f,
                    None => chain.push(f),
                }
                Ok(Spec::Filters(chain))
            }
            (Spec::Filters(mut chain), Change::RemoveFilter(module)) => {
                let before = chain.len();
                chain.retain(|c| c.module != module);
                if chain.len() == before {
                    return Err(format!("no filter `{module}` in the active chain"));
                }
                Ok(Spec::Filters(chain))
            }
            (Spec::Policies(_), _) => Err("the policies scope changes rules, not filters".into()),
            (Spec::Filters(_), _) => Err("a filters scope changes filters, not rules".into()),
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

    fn rule(rooms: &str, cap: &str) -> PolicyRule {
        PolicyRule {
            tenant: "*".into(),
            rooms: rooms.into(),
            class: None,
            module: "native".into(),
            params: [("cap_per_sec".to_owned(), cap.to_owned())].into(),
            on_failure: OnFailure::Open,
        }
    }

    #[test]
    fn a_rule_level_change_keeps_every_other_rule() {
        let set = Spec::Policies(vec![rule("vip-*", "50"), rule("*", "20")]);
        // A new rule for some rooms goes first, where it takes them.
        let added = set.changed(Change::AddRule(rule("show-*", "5"))).expect("add");
        assert_eq!(
            added,
            Spec::Policies(vec![rule("show-*", "5"), rule("vip-*", "50"), rule("*", "20")])
        );
        // The same selector again replaces that rule where it stands.
        let replaced = added.changed(Change::AddRule(rule("*", "7"))).expect("replace");
        let Spec::Policies(rules) = &replaced else {
            panic!("policies")
        };
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[2], rule("*", "7"));
        let star = RuleSelector {
            tenant: "*".into(),
            rooms: "*".into(),
            class: None,
        };
        let removed = replaced.changed(Change::RemoveRule(star.clone())).expect("remove");
        assert_eq!(removed, Spec::Policies(vec![rule("show-*", "5"), rule("vip-*", "50")]));
        assert!(removed.changed(Change::RemoveRule(star)).is_err(), "nothing to remove");
        assert!(removed.changed(Change::RemoveFilter("x".into())).is_err());

        let f = |m: &str| FilterUse {
            module: m.into(),
            params: BTreeMap::new(),
            on_failure: OnFailure::Closed,
        };
        let chain = Spec::Filters(vec![f("a"), f("b")]);
        assert_eq!(
            chain.changed(Change::AddFilter(f("c"))),
            Ok(Spec::Filters(vec![f("a"), f("b"), f("c")]))
        );
        assert_eq!(
            chain.changed(Change::RemoveFilter("a".into())),
            Ok(Spec::Filters(vec![f("b")]))
        );
        assert!(rule("show-*", "5").matches("acme", "show-1", "small"));
        assert!(!rule("show-*", "5").matches("acme", "lobby", "small"));
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
