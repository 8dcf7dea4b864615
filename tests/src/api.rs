//! A small client of the edge's admin API for tests: real HTTP over
//! loopback, every answer as (status, JSON).

use std::net::SocketAddr;

use serde_json::Value;

/// Calls `/v1` on one edge with one bearer credential.
#[derive(Debug, Clone)]
pub struct Api {
    pub base: String,
    pub bearer: Option<String>,
}

/// An answer: HTTP status and the JSON body (`Value::Null` if not JSON).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    /// The cursor of a listing's next page (`x-next-after`), if more follow.
    pub next: Option<String>,
}

impl Answer {
    /// The stable error code, if this is an error.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    pub fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

impl Api {
    pub fn new(admin: SocketAddr, bearer: impl Into<String>) -> Self {
        Api {
            base: format!("http://{admin}"),
            bearer: Some(bearer.into()),
        }
    }

    pub fn anonymous(admin: SocketAddr) -> Self {
        Api {
            base: format!("http://{admin}"),
            bearer: None,
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.call("GET", path, None, "application/json").await
    }

    pub async fn post(&self, path: &str, json: Value) -> Answer {
        let body = serde_json::to_vec(&json).expect("JSON");
        self.call("POST", path, Some(body), "application/json").await
    }

    pub async fn post_bytes(&self, path: &str, bytes: &[u8]) -> Answer {
        self.call("POST", path, Some(bytes.to_vec()), "application/wasm").await
    }

    /// Uploads `bytes` as module `name` `version` of `world`, checked with `params`.
    pub async fn upload(&self, bytes: &[u8], name: &str, version: &str, world: &str, params: Value) -> Answer {
        let params = serde_json::to_string(&params).expect("JSON");
        let path = format!(
            "/v1/modules?name={name}&version={version}&world={world}&params={}",
            encode(&params)
        );
        self.post_bytes(&path, bytes).await
    }

    async fn call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Vec<u8>>,
        content_type: &'static str,
    ) -> Answer {
        let url = format!("{}{path}", self.base);
        let bearer = self.bearer.clone();
        tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(std::time::Duration::from_secs(120)))
                .build()
                .into();
            let auth = bearer.map(|b| format!("Bearer {b}"));
            let mut response = match (method, body) {
                ("GET", _) => {
                    let mut r = agent.get(&url);
                    if let Some(a) = &auth {
                        r = r.header("Authorization", a);
                    }
                    r.call()
                }
                (_, body) => {
                    let mut r = agent.post(&url).header("Content-Type", content_type);
                    if let Some(a) = &auth {
                        r = r.header("Authorization", a);
                    }
                    r.send(body.unwrap_or_default())
                }
            }
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
            let status = response.status().as_u16();
            let next = response
                .headers()
                .get("x-next-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let text = response.body_mut().read_to_string().unwrap_or_default();
            Answer {
                status,
                body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
                next,
            }
        })
        .await
        .expect("request task")
    }
}

/// Percent-encodes a query value.
pub fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
