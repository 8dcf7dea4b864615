//! The checks behind `fuzz/fuzz_targets/`, shared with the corpus replay in
//! `tests/fuzz_corpus.rs` so CI runs every saved input through the same
//! properties. Each takes the fuzzer's raw bytes and panics only when a
//! property fails; input it cannot use is simply ignored.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};

use crate::auth::{Authenticator, Claims};
use crate::config::{Config, ConfigError, TenantConfig};
use crate::wasm::bindings::{Counters, GiftCount, TickPlan, Verdict};
use crate::wasm::policy::{MAX_GIFT_NAME, MAX_PINNED, MAX_PLAN_GIFTS};

/// Target `config`: arbitrary text through [`Config::parse`], relative paths
/// resolved against `edge-config/` so the shipped key file can be named.
/// An error must name a key; a config that loads must hold what validation
/// promises, and its tenants must give an [`Authenticator`].
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let base = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../edge-config"));
    let config = match Config::parse(text, "<fuzz>", base) {
        Ok(config) => config,
        Err(ConfigError::Parse { key, .. } | ConfigError::Invalid { key, .. }) => {
            assert!(!key.is_empty(), "a config error names no key: {text:?}");
            return;
        }
        Err(e @ ConfigError::Read { .. }) => panic!("parse reads no config file: {e}"),
    };
    let l = &config.limits;
    assert!(l.max_frame_bytes <= throng_wire::HARD_MAX_FRAME);
    assert!(l.max_body_bytes + 512 <= l.max_frame_bytes, "{l:?}");
    let classes = &config.rooms.classes;
    assert_eq!(classes.first().map(|c| c.min_members), Some(0), "{classes:?}");
    assert!(
        classes.windows(2).all(|w| w[0].min_members < w[1].min_members),
        "{classes:?}"
    );
    assert!(classes.iter().all(|c| c.spread < c.tick), "{classes:?}");
    assert!(
        config.filters.keys().all(|t| config.tenants.contains_key(t)),
        "filters for unknown tenants"
    );
    if let Err(e) = Authenticator::new(&config.tenants) {
        panic!("a validated config's tenant keys do not load: {e}");
    }
}

const HS_TENANT: &str = "hs";
const ES_TENANT: &str = "es";
const HS_SECRET: &[u8] = b"fuzzing-secret-0123456789";

struct Keys {
    auth: Authenticator,
    hs: EncodingKey,
    es: EncodingKey,
}

/// One HS256 and one ES256 tenant. The ES256 key pair is made per process:
/// a saved input carries claims, not signatures, and is signed on replay.
fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key generation");
        let tenants = BTreeMap::from([
            (
                HS_TENANT.to_owned(),
                TenantConfig::Hs256 {
                    secret: HS_SECRET.to_vec(),
                },
            ),
            (
                ES_TENANT.to_owned(),
                TenantConfig::Es256 {
                    public_key_pem: pair.public_key_pem().into_bytes(),
                },
            ),
        ]);
        Keys {
            auth: Authenticator::new(&tenants).expect("fuzzing tenants load"),
            hs: EncodingKey::from_secret(HS_SECRET),
            es: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("P-256 private key loads"),
        }
    })
}

/// Who signed a token the fuzzer built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signer {
    Nobody,
    Hs,
    Es,
}

/// Target `token`: [`Authenticator::verify`] on arbitrary strings, on
/// tokens of arbitrary base64url parts, and on tokens properly signed with
/// either tenant's key over arbitrary headers and claims. Only a token
/// signed with the key of the tenant it names may verify, and only before
/// it expires; what it grants may be matched against any room name.
pub fn token(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok((token, signer, exp)) = build_token(&mut u) else {
        return;
    };
    let keys = keys();
    match keys.auth.verify(&token) {
        Ok(grant) => {
            let expected = match signer {
                Signer::Hs => HS_TENANT,
                Signer::Es => ES_TENANT,
                Signer::Nobody => panic!("a token nobody signed verified: {token}"),
            };
            assert_eq!(
                grant.session.tenant, expected,
                "verified with another tenant's key: {token}"
            );
            assert!(!grant.session.user.is_empty());
            // The user id reaches logs and other viewers: bounded, no
            // control characters.
            assert!(grant.session.user.len() <= crate::auth::MAX_SUB_BYTES);
            assert!(!grant.session.user.chars().any(char::is_control));
            if let Some(exp) = exp {
                // The edge allows 5 s of skew; a minute covers a slow replay.
                assert!(
                    exp.saturating_add(60) >= crate::auth::unix_now(),
                    "an expired token verified: {token}"
                );
            }
            let room: String = u.arbitrary().unwrap_or_default();
            let _ = grant.may_join(&room[..room.floor_char_boundary(throng_wire::MAX_ROOM_NAME)]);
        }
        Err(e) => {
            let _ = (e.code(), e.to_string());
        }
    }
}

/// The token, who signed it, and its `exp` when the claims were built whole.
fn build_token(u: &mut Unstructured<'_>) -> arbitrary::Result<(String, Signer, Option<u64>)> {
    let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
    Ok(match u.int_in_range(0..=3u8)? {
        0 => (u.arbitrary::<String>()?, Signer::Nobody, None),
        1 => {
            let parts: [&[u8]; 3] = u.arbitrary()?;
            let token = format!("{}.{}.{}", b64(parts[0]), b64(parts[1]), b64(parts[2]));
            (token, Signer::Nobody, None)
        }
        n => {
            let signer = if n == 2 { Signer::Hs } else { Signer::Es };
            let header: Vec<u8> = match u.int_in_range(0..=3u8)? {
                0 => br#"{"alg":"HS256","typ":"JWT"}"#.to_vec(),
                1 => br#"{"alg":"ES256","typ":"JWT"}"#.to_vec(),
                2 => br#"{"alg":"none"}"#.to_vec(),
                _ => u.arbitrary()?,
            };
            let (payload, exp) = if u.arbitrary()? {
                let claims = arbitrary_claims(u)?;
                let exp = claims.exp;
                (serde_json::to_vec(&claims).expect("claims serialize"), Some(exp))
            } else {
                (u.arbitrary::<Vec<u8>>()?, None)
            };
            let message = format!("{}.{}", b64(&header), b64(&payload));
            let (key, alg) = match signer {
                Signer::Es => (&keys().es, Algorithm::ES256),
                _ => (&keys().hs, Algorithm::HS256),
            };
            let sig = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).expect("signing works");
            (format!("{message}.{sig}"), signer, exp)
        }
    })
}

fn arbitrary_claims(u: &mut Unstructured<'_>) -> arbitrary::Result<Claims> {
    let pick = |u: &mut Unstructured<'_>, known: &[&str]| -> arbitrary::Result<String> {
        match u.choose_index(known.len() + 1)? {
            i if i < known.len() => Ok(known[i].to_owned()),
            _ => u.arbitrary(),
        }
    };
    let now = crate::auth::unix_now();
    Ok(Claims {
        tenant: pick(u, &[HS_TENANT, ES_TENANT])?,
        sub: pick(u, &["alice"])?,
        role: pick(u, &["viewer", "host", "moderator"])?,
        rooms: pick(u, &["*", "show-*", "a?c"])?,
        exp: match u.int_in_range(0..=2u8)? {
            0 => now + 3600,
            1 => now.saturating_sub(3600),
            _ => u.arbitrary()?,
        },
        // `nbf` in the past or absent: the oracle below knows `exp` only.
        nbf: match u.int_in_range(0..=1u8)? {
            0 => None,
            _ => Some(now.saturating_sub(60)),
        },
    })
}

/// Target `tick_plan`: [`crate::wasm::policy::validate`] on arbitrary plans
/// against arbitrary inbound counts must accept exactly the plans a plain
/// restatement of the rules accepts.
pub fn tick_plan(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok((plan, inbound)) = arbitrary_plan(&mut u) else {
        return;
    };
    let accepted = crate::wasm::policy::validate(&plan, inbound);
    let deliver: HashSet<u32> = plan.deliver.iter().copied().collect();
    let sound = plan.deliver.len() <= inbound
        && deliver.len() == plan.deliver.len()
        && plan.deliver.iter().all(|&i| (i as usize) < inbound)
        && plan.pinned.len() <= MAX_PINNED
        && plan.pinned.iter().all(|p| deliver.contains(p))
        && plan.counters.gifts.len() <= MAX_PLAN_GIFTS
        && plan.counters.gifts.iter().all(|g| g.gift.len() <= MAX_GIFT_NAME);
    assert_eq!(
        accepted.is_ok(),
        sound,
        "validate said {accepted:?} for {inbound} inbound: {plan:?}"
    );
}

/// Most messages in one tick's inbound batch the fuzzer tries.
const MAX_FUZZ_INBOUND: usize = 2048;

fn arbitrary_plan(u: &mut Unstructured<'_>) -> arbitrary::Result<(TickPlan, usize)> {
    let inbound = u.int_in_range(0..=MAX_FUZZ_INBOUND)?;
    // Mostly near the valid range, so acceptance is reached, sometimes anything.
    let index = |u: &mut Unstructured<'_>| -> arbitrary::Result<u32> {
        if u.ratio(7, 8)? {
            u.int_in_range(0..=inbound as u32)
        } else {
            u.arbitrary()
        }
    };
    let deliver = (0..u.arbitrary_len::<u32>()?)
        .map(|_| index(u))
        .collect::<arbitrary::Result<_>>()?;
    let pinned = (0..u.int_in_range(0..=MAX_PINNED + 1)?)
        .map(|_| index(u))
        .collect::<arbitrary::Result<_>>()?;
    let gifts = (0..u.int_in_range(0..=MAX_PLAN_GIFTS + 1)?)
        .map(|_| {
            Ok(GiftCount {
                gift: <&str>::arbitrary(u)?.to_owned(),
                count: u.arbitrary()?,
            })
        })
        .collect::<arbitrary::Result<_>>()?;
    let plan = TickPlan {
        deliver,
        counters: Counters {
            likes: u.arbitrary()?,
            gifts,
        },
        pinned,
    };
    Ok((plan, inbound))
}

/// Target `filter_verdicts`: [`crate::wasm::filter::validate`] on arbitrary
/// verdict lists against arbitrary batch sizes accepts exactly one verdict
/// per message, and a rejection's reason cut for the sender stays a prefix
/// within the limit whatever its characters.
pub fn filter_verdicts(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok((verdicts, batch)) = arbitrary_verdicts(&mut u) else {
        return;
    };
    let accepted = crate::wasm::filter::validate(&verdicts, batch);
    assert_eq!(
        accepted.is_ok(),
        verdicts.len() == batch,
        "{accepted:?} for {batch}: {verdicts:?}"
    );
    for v in &verdicts {
        if let Verdict::Reject(reason) = v {
            let told = &reason[..reason.floor_char_boundary(crate::room::MAX_REASON)];
            assert!(reason.starts_with(told) && told.len() <= crate::room::MAX_REASON);
        }
    }
}

/// Most messages in one filter call's batch the fuzzer tries.
const MAX_FUZZ_BATCH: usize = 1024;

fn arbitrary_verdicts(u: &mut Unstructured<'_>) -> arbitrary::Result<(Vec<Verdict>, usize)> {
    let batch = u.int_in_range(0..=MAX_FUZZ_BATCH)?;
    let count = if u.ratio(3, 4)? {
        batch
    } else {
        u.int_in_range(0..=MAX_FUZZ_BATCH)?
    };
    let verdicts = (0..count)
        .map_while(|_| {
            Some(match u.int_in_range(0..=2u8).ok()? {
                0 => Verdict::Accept,
                1 => Verdict::Reject(u.arbitrary().ok()?),
                _ => Verdict::Rewrite(u.arbitrary().ok()?),
            })
        })
        .collect::<Vec<_>>();
    Ok((verdicts, batch))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(claims: &Claims, signer: Signer) -> String {
        let header = match signer {
            Signer::Es => br#"{"alg":"ES256","typ":"JWT"}"#.as_slice(),
            _ => br#"{"alg":"HS256","typ":"JWT"}"#.as_slice(),
        };
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap())
        );
        let (key, alg) = match signer {
            Signer::Es => (&keys().es, Algorithm::ES256),
            _ => (&keys().hs, Algorithm::HS256),
        };
        format!(
            "{message}.{}",
            jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap()
        )
    }

    fn claims(tenant: &str) -> Claims {
        Claims {
            tenant: tenant.into(),
            sub: "alice".into(),
            role: "viewer".into(),
            rooms: "*".into(),
            exp: crate::auth::unix_now() + 3600,
            nbf: None,
        }
    }

    /// The token target's "only the right key verifies" is worth something
    /// only if its own signed tokens do verify.
    #[test]
    fn the_token_targets_keys_sign_tokens_that_verify() {
        let auth = &keys().auth;
        assert_eq!(
            auth.verify(&signed(&claims(HS_TENANT), Signer::Hs))
                .unwrap()
                .session
                .tenant,
            HS_TENANT
        );
        assert_eq!(
            auth.verify(&signed(&claims(ES_TENANT), Signer::Es))
                .unwrap()
                .session
                .tenant,
            ES_TENANT
        );
        assert!(auth.verify(&signed(&claims(ES_TENANT), Signer::Hs)).is_err());
        assert!(auth.verify(&signed(&claims(HS_TENANT), Signer::Es)).is_err());
    }
}
