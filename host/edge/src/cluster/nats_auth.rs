//! NATS users for a cluster: one nkey per edge, allowed to speak only as
//! itself, and app users (a tenant's backend, anything client-facing)
//! kept off the bus entirely.
//!
//! `throng nats-auth` writes the seeds and prints the `authorization`
//! block for nats-server's config; the tests run their clusters with it.
//! NATS checks every publish against these permissions, so a holder of one
//! edge's seed can forge nothing in another edge's name, and a holder of an
//! app user's credentials cannot publish or read on `throng.>`.

use super::bus;

/// Who a NATS user is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An edge: its `name` is its edge id.
    Edge,
    /// Anything else that shares the NATS server.
    App,
}

/// One NATS user: a name (an edge id for an edge), its nkey seed (the
/// secret, for the user's side) and public key (for the server's config).
#[derive(Clone)]
pub struct User {
    pub name: String,
    pub role: Role,
    pub seed: String,
    pub public_key: String,
}

impl std::fmt::Debug for User {
    // The seed is a secret: never in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

/// Why users could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("`{0}` is not an edge id: {1}")]
    Name(String, String),
    #[error("`{0}` is named twice")]
    Twice(String),
    #[error("cannot make an nkey: {0}")]
    Key(String),
}

/// A fresh nkey for each name.
pub fn users(edges: &[String], apps: &[String]) -> Result<Vec<User>, AuthError> {
    let mut seen = std::collections::BTreeSet::new();
    let named = edges
        .iter()
        .map(|e| (e, Role::Edge))
        .chain(apps.iter().map(|a| (a, Role::App)));
    let mut out = Vec::new();
    for (name, role) in named {
        crate::config::check_bus_token(name).map_err(|why| AuthError::Name(name.clone(), why))?;
        if !seen.insert(name.clone()) {
            return Err(AuthError::Twice(name.clone()));
        }
        let key = nkeys::KeyPair::new_user();
        out.push(User {
            name: name.clone(),
            role,
            seed: key.seed().map_err(|e| AuthError::Key(e.to_string()))?,
            public_key: key.public_key(),
        });
    }
    Ok(out)
}

/// The `authorization` block of nats-server's config for `users`.
pub fn authorization(users: &[User]) -> String {
    let list = |subjects: &[String]| {
        subjects
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let reserved = list(&bus::reserved_subjects());
    let mut out = String::from(
        "# Made by `throng nats-auth`: each edge may publish only as itself;\n\
         # app users may neither publish nor subscribe on the bus.\n\
         authorization {\n  users = [\n",
    );
    for u in users {
        match u.role {
            Role::Edge => out.push_str(&format!(
                "    # edge {name}\n    {{ nkey: \"{key}\", permissions: {{ publish: {{ allow: [{allow}] }}, \
                 subscribe: {{ allow: [\"throng.>\", \"_INBOX.>\", \"$JS.>\", \"$KV.>\"] }}, allow_responses: true }} }}\n",
                name = u.name,
                key = u.public_key,
                allow = list(&bus::edge_permissions(&u.name)),
            )),
            Role::App => out.push_str(&format!(
                "    # app {name}\n    {{ nkey: \"{key}\", permissions: {{ publish: {{ deny: [{reserved}] }}, \
                 subscribe: {{ deny: [{reserved}] }} }} }}\n",
                name = u.name,
                key = u.public_key,
            )),
        }
    }
    out.push_str("  ]\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_edge_may_publish_only_as_itself() {
        let users = users(&["a".into(), "b".into()], &["backend".into()]).expect("users");
        let conf = authorization(&users);
        for u in &users {
            assert!(conf.contains(&u.public_key), "{conf}");
            assert!(!conf.contains(&u.seed), "a seed in the server's config");
            assert!(u.seed.starts_with("SU"), "{}", u.seed);
        }
        assert!(conf.contains("\"throng.*.a\", \"throng.*.*.a\""), "{conf}");
        assert!(conf.contains("deny: [\"throng.>\""), "{conf}");
        assert!(!format!("{users:?}").contains(&users[0].seed));
    }

    #[test]
    fn names_are_edge_ids_and_unique() {
        assert!(matches!(users(&["a.b".into()], &[]), Err(AuthError::Name(..))));
        assert!(matches!(users(&["a".into()], &["a".into()]), Err(AuthError::Twice(_))));
    }
}
