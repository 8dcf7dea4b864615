//! JWT authentication: which tenant, which user, which role, which rooms.
//!
//! The tenant is read from the token's payload *before* verification only to
//! pick the key; the signature is then checked with that tenant's key and
//! algorithm, and the verified `tenant` claim must name the same tenant.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use throng_wire::{ErrorCode, Role, Session};
use wildmatch::WildMatch;

use crate::config::TenantConfig;

/// Seconds of clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 5;
/// Longest token accepted; checked before anything is decoded.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Longest user id (`sub`), in bytes.
pub const MAX_SUB_BYTES: usize = 256;
/// Longest room pattern (`rooms`), in bytes.
pub const MAX_ROOMS_PATTERN_BYTES: usize = 256;
/// The role of a tenant's administrator: the admin API, never a room.
pub const TENANT_ADMIN: &str = "tenant-admin";
/// How much of an untrusted value (from a token not yet verified) an error
/// message quotes.
const QUOTE: usize = 64;

/// Why a token was refused. Each maps to a stable wire code.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    #[error("no token")]
    Missing,
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token names unknown tenant `{0}`")]
    UnknownTenant(String),
    #[error("token algorithm `{found}` is not allowed for this tenant (expected {expected})")]
    Algorithm { found: String, expected: String },
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token is {0} bytes; the limit is {MAX_TOKEN_BYTES}")]
    TooLong(usize),
    #[error("token signature does not verify with the tenant's key")]
    BadSignature,
}

impl AuthError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Missing => ErrorCode::Unauthenticated,
            Self::Malformed(_) => ErrorCode::TokenMalformed,
            Self::UnknownTenant(_) => ErrorCode::UnknownTenant,
            Self::Algorithm { .. } => ErrorCode::AlgorithmNotAllowed,
            Self::Expired => ErrorCode::TokenExpired,
            Self::NotYetValid => ErrorCode::TokenInvalid,
            Self::TooLong(_) => ErrorCode::TokenMalformed,
            Self::BadSignature => ErrorCode::TokenInvalid,
        }
    }
}

/// The claims of a Throng token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub tenant: String,
    /// The user id.
    pub sub: String,
    /// `viewer`, `host` or `moderator`.
    pub role: String,
    /// A pattern of the rooms this token may join: `*` and `?` wildcards,
    /// e.g. `show-*`.
    pub rooms: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// What a verified token grants.
#[derive(Debug, Clone)]
pub struct Grant {
    pub session: Session,
    /// When the token expires, seconds since the Unix epoch.
    pub expires_at: u64,
    rooms: WildMatch,
}

impl Grant {
    /// Whether this token may join `room` (a name inside its tenant).
    pub fn may_join(&self, room: &str) -> bool {
        self.rooms.matches(room)
    }
}

struct TenantKey {
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Verifies tokens against the configured tenants' keys.
pub struct Authenticator {
    tenants: HashMap<String, TenantKey>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("tenants", &self.tenants.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
}

#[derive(Deserialize)]
struct TenantOnly {
    tenant: String,
}

impl Authenticator {
    /// Builds decoding keys once; config validation has already checked them.
    pub fn new<'a>(tenants: impl IntoIterator<Item = (&'a String, &'a TenantConfig)>) -> Result<Self, String> {
        let mut map = HashMap::new();
        for (id, t) in tenants {
            let key = match t {
                TenantConfig::Hs256 { secret } => TenantKey {
                    algorithm: Algorithm::HS256,
                    key: DecodingKey::from_secret(secret),
                },
                TenantConfig::Es256 { public_key_pem } => TenantKey {
                    algorithm: Algorithm::ES256,
                    key: DecodingKey::from_ec_pem(public_key_pem).map_err(|e| format!("tenant {id}: {e}"))?,
                },
            };
            map.insert(id.clone(), key);
        }
        Ok(Self { tenants: map })
    }

    /// The tenants it knows, sorted.
    pub fn tenants(&self) -> Vec<String> {
        let mut t: Vec<String> = self.tenants.keys().cloned().collect();
        t.sort();
        t
    }

    /// Verifies `token` and returns what it grants.
    pub fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        let claims = self.verify_claims(token)?;
        let role: Role = claims
            .role
            .parse()
            .map_err(|e: String| AuthError::Malformed(crate::untrusted(&e, 2 * QUOTE)))?;
        if claims.rooms.is_empty() {
            return Err(AuthError::Malformed("empty `rooms` claim".into()));
        }
        if claims.rooms.len() > MAX_ROOMS_PATTERN_BYTES {
            return Err(AuthError::Malformed(format!(
                "`rooms` is {} bytes; the limit is {MAX_ROOMS_PATTERN_BYTES}",
                claims.rooms.len()
            )));
        }
        Ok(Grant {
            session: Session {
                tenant: claims.tenant,
                user: claims.sub,
                role,
            },
            expires_at: claims.exp,
            rooms: WildMatch::new(&claims.rooms),
        })
    }

    /// Verifies a tenant administrator's token (role `tenant-admin`) for
    /// the admin API; returns the tenant and the user. Such a token joins
    /// no room: [`Self::verify`] refuses its role.
    pub fn verify_tenant_admin(&self, token: &str) -> Result<(String, String), AuthError> {
        let claims = self.verify_claims(token)?;
        if claims.role != TENANT_ADMIN {
            return Err(AuthError::Malformed(format!(
                "role `{}` is not `{TENANT_ADMIN}`",
                crate::untrusted(&claims.role, QUOTE)
            )));
        }
        Ok((claims.tenant, claims.sub))
    }

    /// The signature, expiry, tenant and user checks every token passes.
    fn verify_claims(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLong(token.len()));
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(_sig), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed("expected three dot-separated parts".into()));
        };
        let header: RawHeader = decode_json_part(header, "header")?;
        let tenant_id = decode_json_part::<TenantOnly>(payload, "payload")?.tenant;
        let tenant = self
            .tenants
            .get(&tenant_id)
            .ok_or_else(|| AuthError::UnknownTenant(crate::untrusted(&tenant_id, QUOTE)))?;
        let expected = format!("{:?}", tenant.algorithm);
        if header.alg != expected {
            return Err(AuthError::Algorithm {
                found: crate::untrusted(&header.alg, QUOTE),
                expected,
            });
        }

        let mut validation = Validation::new(tenant.algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &tenant.key, &validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::Algorithm {
                found: crate::untrusted(&header_alg(token), QUOTE),
                expected: expected.clone(),
            },
            // An ES256 signature of the wrong shape is a signature that does not verify.
            ErrorKind::InvalidEcdsaKey | ErrorKind::Crypto(_) => AuthError::BadSignature,
            _ => AuthError::Malformed(crate::untrusted(&e.to_string(), 2 * QUOTE)),
        })?;
        let claims = data.claims;
        if claims.tenant != tenant_id {
            return Err(AuthError::Malformed("tenant claim changed between reads".into()));
        }
        if claims.sub.is_empty() {
            return Err(AuthError::Malformed("empty `sub` claim".into()));
        }
        // The user id is echoed to other viewers and written to logs.
        if claims.sub.len() > MAX_SUB_BYTES {
            return Err(AuthError::Malformed(format!(
                "`sub` is {} bytes; the limit is {MAX_SUB_BYTES}",
                claims.sub.len()
            )));
        }
        if claims.sub.chars().any(char::is_control) {
            return Err(AuthError::Malformed("`sub` contains control characters".into()));
        }
        Ok(claims)
    }
}

fn decode_json_part<T: serde::de::DeserializeOwned>(part: &str, what: &str) -> Result<T, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|e| AuthError::Malformed(format!("{what} is not base64url: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| AuthError::Malformed(crate::untrusted(&format!("{what}: {e}"), 2 * QUOTE)))
}

fn header_alg(token: &str) -> String {
    token
        .split('.')
        .next()
        .and_then(|h| decode_json_part::<RawHeader>(h, "header").ok())
        .map(|h| h.alg)
        .unwrap_or_default()
}

/// Signs a token; used by `throng token` and by tests.
pub fn sign(claims: &Claims, tenant: &TenantConfig, es256_private_pem: Option<&[u8]>) -> Result<String, String> {
    let (header, key) = match tenant {
        TenantConfig::Hs256 { secret } => (Header::new(Algorithm::HS256), EncodingKey::from_secret(secret)),
        TenantConfig::Es256 { .. } => {
            let pem = es256_private_pem.ok_or("tenant uses ES256: pass its private key (PEM)")?;
            (
                Header::new(Algorithm::ES256),
                EncodingKey::from_ec_pem(pem).map_err(|e| format!("not an EC private key in PEM: {e}"))?,
            )
        }
    };
    jsonwebtoken::encode(&header, claims, &key).map_err(|e| e.to_string())
}

/// Seconds since the Unix epoch, for `exp`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> (String, TenantConfig) {
        (
            "acme".into(),
            TenantConfig::Hs256 {
                secret: b"0123456789abcdef".to_vec(),
            },
        )
    }

    fn claims(exp: u64) -> Claims {
        Claims {
            tenant: "acme".into(),
            sub: "alice".into(),
            role: "viewer".into(),
            rooms: "show-*".into(),
            exp,
            nbf: None,
        }
    }

    fn auth() -> Authenticator {
        let (id, t) = tenant();
        Authenticator::new([(&id, &t)]).unwrap()
    }

    #[test]
    fn good_token_grants_its_rooms() {
        let (_, t) = tenant();
        let tok = sign(&claims(unix_now() + 60), &t, None).unwrap();
        let g = auth().verify(&tok).unwrap();
        assert_eq!(g.session.user, "alice");
        assert_eq!(g.session.role, Role::Viewer);
        assert!(g.may_join("show-1"));
        assert!(!g.may_join("lobby"));
    }

    #[test]
    fn each_bad_token_gets_its_code() {
        let (_, t) = tenant();
        let a = auth();
        let expired = sign(&claims(unix_now() - 120), &t, None).unwrap();
        assert_eq!(a.verify(&expired).unwrap_err().code(), ErrorCode::TokenExpired);
        let other = TenantConfig::Hs256 {
            secret: b"another-secret-entirely".to_vec(),
        };
        let wrong_key = sign(&claims(unix_now() + 60), &other, None).unwrap();
        assert_eq!(a.verify(&wrong_key).unwrap_err().code(), ErrorCode::TokenInvalid);
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(unix_now() + 60)).unwrap());
        let alg_none = format!("{none_header}.{body}.");
        assert_eq!(a.verify(&alg_none).unwrap_err().code(), ErrorCode::AlgorithmNotAllowed);
        assert_eq!(a.verify("not-a-jwt").unwrap_err().code(), ErrorCode::TokenMalformed);
        assert_eq!(a.verify("").unwrap_err().code(), ErrorCode::Unauthenticated);
        let mut c = claims(unix_now() + 60);
        c.tenant = "initech".into();
        let unknown = sign(&c, &t, None).unwrap();
        assert_eq!(a.verify(&unknown).unwrap_err().code(), ErrorCode::UnknownTenant);
        let mut c = claims(unix_now() + 60);
        c.role = "admin".into();
        assert_eq!(
            a.verify(&sign(&c, &t, None).unwrap()).unwrap_err().code(),
            ErrorCode::TokenMalformed
        );
        let mut c = claims(unix_now() + 600);
        c.nbf = Some(unix_now() + 300);
        assert_eq!(
            a.verify(&sign(&c, &t, None).unwrap()).unwrap_err(),
            AuthError::NotYetValid
        );
        let mut c = claims(unix_now() + 60);
        c.sub = "x".repeat(44 * 1024);
        assert_eq!(
            a.verify(&sign(&c, &t, None).unwrap()).unwrap_err().code(),
            ErrorCode::TokenMalformed
        );
        let mut c = claims(unix_now() + 60);
        c.sub = "a".repeat(MAX_SUB_BYTES + 1);
        assert_eq!(
            a.verify(&sign(&c, &t, None).unwrap()).unwrap_err().code(),
            ErrorCode::TokenMalformed
        );
        let mut c = claims(unix_now() + 60);
        c.sub = "alice\nINFO forged line".into();
        assert_eq!(
            a.verify(&sign(&c, &t, None).unwrap()).unwrap_err().code(),
            ErrorCode::TokenMalformed
        );
    }

    #[test]
    fn untrusted_values_in_errors_are_escaped_and_bounded() {
        let (_, t) = tenant();
        let mut c = claims(unix_now() + 60);
        c.tenant = format!("evil\n2026-01-01 INFO forged\u{1b}[31m{}", "x".repeat(500));
        let e = auth().verify(&sign(&c, &t, None).unwrap()).unwrap_err().to_string();
        assert!(!e.chars().any(char::is_control), "{e:?}");
        assert!(e.len() < 200, "{e}");
    }
}
