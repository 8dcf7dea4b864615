//! `throng module` and `throng admin`: the admin API (`/v1`) from a shell.
//! Each command is one or two HTTP calls; `--json` prints the API's answer
//! as it is, otherwise a short human summary. An API error prints its code
//! and message (and the field or step at fault) and exits 1.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

/// The dev config's admin endpoint.
const DEV_ADMIN: &str = "http://127.0.0.1:9433";

/// Where the API is and who calls it.
#[derive(Debug, Args)]
pub struct Connection {
    /// The edge's admin endpoint (`server.admin`).
    #[arg(long, env = "THRONG_ADMIN", default_value = DEV_ADMIN, global = true)]
    admin: String,
    /// An operator key, or a tenant-admin token (`throng token --role
    /// tenant-admin`). Default for the dev endpoint: the embedded dev
    /// config's operator key.
    #[arg(long, env = "THRONG_ADMIN_KEY", hide_env_values = true, global = true)]
    key: Option<String>,
    /// Print the API's JSON answer.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ModuleArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    action: ModuleAction,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum WorldArg {
    RoomPolicy,
    MessageFilter,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FailArg {
    Open,
    Closed,
}

/// Where and how a deploy puts its module (`module deploy`, and `module
/// upload --deploy`).
#[derive(Debug, Args)]
struct DeployArgs {
    /// Into the active set; the other rules (or filters) stay.
    #[arg(long, conflicts_with_all = ["replace", "remove"])]
    add: bool,
    /// Out of the active set: the rule for --rooms/--for-tenants/--class,
    /// or the filter `module`.
    #[arg(long, conflicts_with = "replace")]
    remove: bool,
    /// As the whole set: every other rule (or filter) goes.
    #[arg(long)]
    replace: bool,
    /// Print the resulting set and the rooms it changes; deploy nothing.
    #[arg(long)]
    dry_run: bool,
    /// Deploy as this tenant's filter chain.
    #[arg(long, conflicts_with = "policies")]
    tenant: Option<String>,
    /// Deploy as the policy rules (operators).
    #[arg(long)]
    policies: bool,
    /// Policy rule: rooms it applies to.
    #[arg(long, default_value = "*")]
    rooms: String,
    /// Policy rule: tenants it applies to.
    #[arg(long, default_value = "*")]
    for_tenants: String,
    /// Policy rule: only rooms of this size class.
    #[arg(long)]
    class: Option<String>,
    #[arg(long, value_enum)]
    on_failure: Option<FailArg>,
    /// Share of rooms to activate it on now (0 keeps it inactive).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100))]
    percent: u8,
    #[arg(long)]
    note: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ModuleAction {
    /// Upload a component; it is checked (size, compile, world, instantiate,
    /// configure with --param, a self-test call) before it is stored.
    Upload {
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        #[arg(long, value_enum)]
        world: WorldArg,
        /// key=value, what `configure` is checked with (and, with
        /// --deploy, what the deployment runs it with); repeatable.
        #[arg(long = "param", value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// Deploy it once stored, in one step: the deploy options below
        /// say where (--tenant or --policies) and how.
        #[arg(long)]
        deploy: bool,
        #[command(flatten)]
        target: DeployArgs,
    },
    /// The modules you may see.
    List,
    /// One module: `sha256:<hex>`, a unique prefix of the hash (8 hex
    /// digits or more), or `name@version`.
    Show { module: String },
    /// A new deployment: one module as a policy rule (--policies) or in a
    /// tenant's filter chain (--tenant). With --add it joins the active
    /// set (replacing the rule for the same rooms, or the same filter)
    /// and the rest stays; --remove takes one out; --replace makes it the
    /// whole set. Without either, a deploy that would drop other rules or
    /// filters is refused with both resulting sets shown. Activated on
    /// --percent of rooms (100: all); `--file` deploys a JSON document
    /// (`{"policies": [...]}` or `{"filters": [...]}`) instead; --dry-run
    /// prints the resulting set and the rooms it changes, and deploys
    /// nothing.
    Deploy {
        /// `sha256:<hex>` (or a unique prefix of 8 hex digits or more),
        /// `name@version` of a stored module, or `builtin:<name>`
        /// (policies also `native`). The deployment stores the whole hash.
        module: Option<String>,
        #[arg(long = "param", value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// A JSON deployment document instead of one module.
        #[arg(long, conflicts_with_all = ["module", "add", "remove", "replace"])]
        file: Option<PathBuf>,
        #[command(flatten)]
        target: DeployArgs,
    },
    /// Put a version on a share of rooms (the rest keep the active one);
    /// again with a larger share to widen it.
    Rollout {
        /// `policies` or `filters/<tenant>`.
        scope: String,
        #[arg(long)]
        version: u64,
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
        percent: u8,
    },
    /// Return a scope to an earlier version (default: the one before).
    Rollback {
        scope: String,
        #[arg(long)]
        to: Option<u64>,
    },
    /// What is active, per scope (or one scope, with its versions).
    Status { scope: Option<String> },
    /// Which edge runs which version of each scope (in a cluster, every
    /// edge's last report; an edge behind or failing is marked).
    Edges,
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    action: AdminAction,
}

#[derive(Debug, Subcommand)]
enum AdminAction {
    /// Live rooms on the edge and what they run.
    Rooms {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// One room.
    Room { tenant: String, room: String },
    /// Tenants and their rooms, viewers and rates.
    Tenants,
    /// Close every session of a user on the edge.
    Disconnect {
        tenant: String,
        user: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Publish a system or host message into a room.
    Publish {
        tenant: String,
        room: String,
        text: String,
        #[arg(long, default_value = "system")]
        kind: String,
        #[arg(long)]
        sender: Option<String>,
    },
    /// The audit log (oldest first), each entry with its time (UTC).
    Audit {
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only entries about this target: a scope (`policies`,
        /// `filters/<tenant>`), `sha256:<hex>`, a room.
        #[arg(long)]
        target: Option<String>,
        /// Only entries by this actor (`operator:<name>`, `tenant:<id>/<user>`).
        #[arg(long)]
        who: Option<String>,
        /// Only this action (`deployment.activate`) or family (`deployment`).
        #[arg(long)]
        action: Option<String>,
        /// Only entries since then: a time ago (`1h`, `30m`) or an RFC 3339
        /// time (`2026-12-08T03:00:00Z`).
        #[arg(long, value_parser = parse_since)]
        since: Option<u64>,
    },
}

/// `--since`: a time ago or an RFC 3339 time, as Unix ms.
fn parse_since(s: &str) -> Result<u64, String> {
    let at = match humantime::parse_duration(s) {
        Ok(ago) => std::time::SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("`{s}` ago is before 1970"))?,
        Err(_) => humantime::parse_rfc3339_weak(s)
            .map_err(|_| format!("`{s}`: expected a time ago (1h, 30m) or an RFC 3339 time (2026-12-08T03:00:00Z)"))?,
    };
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .map_err(|_| format!("`{s}` is before 1970"))
}

/// Unix ms as an RFC 3339 time (UTC, to the second).
fn utc(ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(at).to_string()
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{s}`: expected key=value"))
}

struct Api {
    base: String,
    auth: String,
    json: bool,
}

impl Api {
    fn new(c: &Connection) -> Result<Self> {
        let key = match (&c.key, c.admin.trim_end_matches('/') == DEV_ADMIN) {
            (Some(k), _) => k.clone(),
            (None, true) => throng_edge::Config::dev()
                .context("embedded dev config")?
                .control
                .operators
                .first()
                .map(|o| o.key.clone())
                .context("the dev config has no operator key")?,
            (None, false) => bail!("--key (or THRONG_ADMIN_KEY) is needed for an edge other than the dev default"),
        };
        Ok(Api {
            base: c.admin.trim_end_matches('/').to_owned(),
            auth: format!("Bearer {key}"),
            json: c.json,
        })
    }

    async fn call(&self, method: &'static str, path: &str, body: Option<(Vec<u8>, &'static str)>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let auth = self.auth.clone();
        let (status, text) = tokio::task::spawn_blocking({
            let url = url.clone();
            move || -> Result<(u16, String)> {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(std::time::Duration::from_secs(180)))
                    .build()
                    .into();
                let mut response = match body {
                    None => agent.get(&url).header("Authorization", &auth).call(),
                    Some((bytes, content_type)) => agent
                        .post(&url)
                        .header("Authorization", &auth)
                        .header("Content-Type", content_type)
                        .send(&bytes[..]),
                }
                .with_context(|| format!("{method} {url}"))?;
                let status = response.status().as_u16();
                let text = response.body_mut().read_to_string().unwrap_or_default();
                Ok((status, text))
            }
        })
        .await
        .context("request task")??;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status >= 400 {
            let e = &value["error"];
            let field = e["field"].as_str().map(|f| format!(" [{f}]")).unwrap_or_default();
            // The query holds the caller's own params, percent-encoded:
            // the path alone says which call failed.
            let path = path.split('?').next().unwrap_or(path);
            bail!(
                "{method} {path}: {status} {}{field}: {}",
                e["code"].as_str().unwrap_or("error"),
                e["message"].as_str().unwrap_or(&value.to_string())
            );
        }
        Ok(value)
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.call("GET", path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value> {
        self.call("POST", path, Some((serde_json::to_vec(&body)?, "application/json")))
            .await
    }

    /// Prints `v` as JSON with --json, else `human(v)`.
    fn show(&self, v: &Value, human: impl FnOnce(&Value) -> String) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            print!("{}", human(v));
        }
    }
}

fn scope_path(scope: &str) -> Result<String> {
    if scope == "policies"
        || scope
            .strip_prefix("filters/")
            .is_some_and(|t| !t.is_empty() && !t.contains('/'))
    {
        Ok(format!("/v1/deployments/{scope}"))
    } else {
        bail!("`{scope}`: a scope is `policies` or `filters/<tenant>`")
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A set of rules or filters, one per line, as a person reads it.
fn listing(set: &Value) -> String {
    let Some(items) = set.as_array() else {
        return "    (none)\n".into();
    };
    if items.is_empty() {
        return "    (none)\n".into();
    }
    items
        .iter()
        .map(|r| {
            let params: Vec<String> = r["params"]
                .as_object()
                .map(|p| p.iter().map(|(k, v)| format!("{k}={}", s(v))).collect())
                .unwrap_or_default();
            let at = if r.get("rooms").is_some() {
                format!(
                    "tenant {} rooms {}{}: ",
                    s(&r["tenant"]),
                    s(&r["rooms"]),
                    r.get("class").map(|c| format!(" class {}", s(c))).unwrap_or_default()
                )
            } else {
                String::new()
            };
            format!("    {at}{} {}\n", s(&r["module"]), params.join(" "))
        })
        .collect()
}

/// A set with every rule's defaults filled in, to compare what the CLI
/// sends with what the edge shows.
fn normalized(set: &Value) -> Vec<(String, String, String, String, String)> {
    set.as_array()
        .map(|items| {
            items
                .iter()
                .map(|r| {
                    let or = |v: &Value, d: &str| if v.is_null() { d.to_owned() } else { s(v) };
                    (
                        or(&r["tenant"], "*"),
                        or(&r["rooms"], "*"),
                        s(&r["class"]),
                        s(&r["module"]),
                        r["params"].to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn module_line(m: &Value) -> String {
    format!(
        "sha256:{}  {} {}  {}  {} bytes  owner {}\n",
        s(&m["sha256"]),
        s(&m["name"]),
        s(&m["version"]),
        s(&m["world"]),
        s(&m["size"]),
        s(&m["owner"])
    )
}

fn activation(a: &Value) -> String {
    if a.is_null() {
        return "nothing active".into();
    }
    match a.get("base").filter(|b| !b.is_null()) {
        Some(b) => format!(
            "v{} on {}% of rooms (v{} on the rest)",
            s(&a["version"]),
            s(&a["percent"]),
            s(b)
        ),
        None => format!("v{}", s(&a["version"])),
    }
}

pub async fn module(args: ModuleArgs) -> Result<std::process::ExitCode> {
    let api = Api::new(&args.conn)?;
    match args.action {
        ModuleAction::Upload {
            file,
            name,
            version,
            world,
            params,
            deploy: then_deploy,
            target,
        } => {
            if !then_deploy && (target.tenant.is_some() || target.policies) {
                bail!("--tenant and --policies say where --deploy puts the module: add --deploy");
            }
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let world = match world {
                WorldArg::RoomPolicy => "room-policy",
                WorldArg::MessageFilter => "message-filter",
            };
            let deploy_params = params.clone();
            let params: BTreeMap<String, String> = params.into_iter().collect();
            let path = format!(
                "/v1/modules?name={}&version={}&world={world}&params={}",
                percent_encode(&name),
                percent_encode(&version),
                percent_encode(&serde_json::to_string(&params)?)
            );
            let v = api.call("POST", &path, Some((bytes, "application/wasm"))).await?;
            api.show(&v, |v| {
                let verb = if v["created"] == json!(true) {
                    "stored"
                } else {
                    "already stored"
                };
                format!("{verb}: {}", module_line(&v["module"]))
            });
            if then_deploy {
                let hash = v["module"]["sha256"]
                    .as_str()
                    .context("the upload's answer names no sha256")?;
                return deploy(&api, Some(format!("sha256:{hash}")), None, deploy_params, target).await;
            }
        }
        ModuleAction::List => {
            let v = api.get("/v1/modules").await?;
            api.show(&v, |v| v.as_array().into_iter().flatten().map(module_line).collect());
        }
        ModuleAction::Show { module } => {
            let v = api.get(&format!("/v1/modules/{}", percent_encode(&module))).await?;
            api.show(&v, |v| serde_json::to_string_pretty(v).unwrap_or_default() + "\n");
        }
        ModuleAction::Deploy {
            module,
            params,
            file,
            target,
        } => return deploy(&api, module, file, params, target).await,
        ModuleAction::Rollout {
            scope,
            version,
            percent,
        } => {
            let v = api
                .post(
                    &format!("{}/activate", scope_path(&scope)?),
                    json!({"version": version, "percent": percent}),
                )
                .await?;
            api.show(&v, |v| format!("{scope}: {}\n", activation(v)));
        }
        ModuleAction::Rollback { scope, to } => {
            let body = match to {
                Some(t) => json!({ "to": t }),
                None => json!({}),
            };
            let v = api.post(&format!("{}/rollback", scope_path(&scope)?), body).await?;
            api.show(&v, |v| format!("{scope}: back to {}\n", activation(v)));
        }
        ModuleAction::Status { scope } => {
            let v = match &scope {
                Some(sc) => api.get(&scope_path(sc)?).await?,
                None => api.get("/v1/deployments").await?,
            };
            api.show(&v, |v| {
                let one = |st: &Value| {
                    let mut out = format!("{}: {}\n", s(&st["scope"]), activation(&st["active"]));
                    if scope.is_some() {
                        for d in st["versions"].as_array().into_iter().flatten() {
                            out += &format!(
                                "  v{}  by {}  {}\n",
                                s(&d["version"]),
                                s(&d["created_by"]),
                                d["note"].as_str().unwrap_or("")
                            );
                        }
                    }
                    out
                };
                match v.as_array() {
                    Some(all) => all.iter().map(one).collect(),
                    None => one(v),
                }
            });
        }
        ModuleAction::Edges => {
            let v = api.get("/v1/deployments/edges").await?;
            api.show(&v, |v| {
                let mut out = String::from("in force:");
                for (scope, a) in v["desired"].as_object().into_iter().flatten() {
                    out += &format!(" {scope} {};", activation(a));
                }
                out.push('\n');
                for e in v["edges"].as_array().into_iter().flatten() {
                    let state = match (e["live"].as_bool(), e["in_step"].as_bool()) {
                        (Some(false), _) => "gone",
                        (_, Some(true)) => "in step",
                        _ => "BEHIND",
                    };
                    out += &format!("{} ({})  {state}:", s(&e["edge_id"]), s(&e["region"]));
                    for (scope, a) in e["running"].as_object().into_iter().flatten() {
                        out += &format!(" {scope} {};", activation(a));
                    }
                    for (scope, f) in e["failing"].as_object().into_iter().flatten() {
                        out += &format!(" FAILING {scope} v{}: {};", s(&f["version"]), s(&f["reason"]));
                    }
                    out.push('\n');
                }
                out
            });
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn room_line(r: &Value) -> String {
    format!(
        "{}/{}  {}  viewers {}  in {:.1}/s  delivered {:.1}/s  dropped {}  filtered {}  policy {} (v{})\n",
        s(&r["tenant"]),
        s(&r["room"]),
        s(&r["kind"]),
        s(&r["viewers"]),
        r["in_per_s"].as_f64().unwrap_or(0.0),
        r["delivered_per_s"].as_f64().unwrap_or(0.0),
        s(&r["dropped_by_policy"]),
        s(&r["filtered"]),
        s(&r["running"]["policy"]),
        s(&r["running"]["policy_version"]),
    )
}

pub async fn admin(args: AdminArgs) -> Result<std::process::ExitCode> {
    let api = Api::new(&args.conn)?;
    match args.action {
        AdminAction::Rooms { tenant } => {
            let path = match tenant {
                Some(t) => format!("/v1/rooms?tenant={}", percent_encode(&t)),
                None => "/v1/rooms".into(),
            };
            let v = api.get(&path).await?;
            api.show(&v, |v| v.as_array().into_iter().flatten().map(room_line).collect());
        }
        AdminAction::Room { tenant, room } => {
            let v = api.get(&format!("/v1/rooms/{tenant}/{room}")).await?;
            api.show(&v, room_line);
        }
        AdminAction::Tenants => {
            let v = api.get("/v1/tenants").await?;
            api.show(&v, |v| {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        format!(
                            "{}  rooms {}  viewers {}  online users {}  in {:.1}/s\n",
                            s(&t["tenant"]),
                            s(&t["rooms"]),
                            s(&t["viewers"]),
                            s(&t["online_users"]),
                            t["in_per_s"].as_f64().unwrap_or(0.0)
                        )
                    })
                    .collect()
            });
        }
        AdminAction::Disconnect { tenant, user, reason } => {
            let body = match reason {
                Some(r) => json!({ "reason": r }),
                None => json!({}),
            };
            let v = api
                .post(
                    &format!("/v1/tenants/{tenant}/users/{}/disconnect", percent_encode(&user)),
                    body,
                )
                .await?;
            api.show(&v, |v| format!("{} connections closed\n", s(&v["connections"])));
        }
        AdminAction::Publish {
            tenant,
            room,
            text,
            kind,
            sender,
        } => {
            let mut body = json!({"kind": kind, "body": text});
            if let Some(sn) = sender {
                body["sender"] = json!(sn);
            }
            let v = api.post(&format!("/v1/rooms/{tenant}/{room}/publish"), body).await?;
            api.show(&v, |v| format!("published as seq {}\n", s(&v["seq"])));
        }
        AdminAction::Audit {
            after,
            limit,
            target,
            who,
            action,
            since,
        } => {
            let mut path = format!("/v1/audit?after={after}&limit={limit}");
            for (key, value) in [("target", target), ("who", who), ("action", action)] {
                if let Some(v) = value {
                    path.push_str(&format!("&{key}={}", percent_encode(&v)));
                }
            }
            if let Some(ms) = since {
                path.push_str(&format!("&since_ms={ms}"));
            }
            let v = api.get(&path).await?;
            api.show(&v, |v| {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        format!(
                            "#{} {} {} {} {} {}{}\n",
                            s(&e["seq"]),
                            e["at_ms"].as_u64().map(utc).unwrap_or_default(),
                            s(&e["who"]),
                            s(&e["action"]),
                            s(&e["target"]),
                            e["from"].as_str().map(|f| format!("{f} -> ")).unwrap_or_default(),
                            e["to"].as_str().or(e["detail"].as_str()).unwrap_or("")
                        )
                    })
                    .collect()
            });
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Deploys one module (or a `--file` document) as `t` says.
async fn deploy(
    api: &Api,
    module: Option<String>,
    file: Option<PathBuf>,
    params: Vec<(String, String)>,
    t: DeployArgs,
) -> Result<std::process::ExitCode> {
    let DeployArgs {
        add,
        remove,
        replace,
        dry_run,
        tenant,
        policies,
        rooms,
        for_tenants,
        class,
        on_failure,
        percent,
        note,
    } = t;
    let scope = match (&tenant, policies) {
        (Some(t), false) => format!("filters/{t}"),
        (None, true) => "policies".into(),
        _ => bail!("say where: --tenant <id> (a filter chain) or --policies"),
    };
    let params: BTreeMap<String, String> = params.into_iter().collect();
    let on_failure = on_failure.map(|f| match f {
        FailArg::Open => "open",
        FailArg::Closed => "closed",
    });
    // One rule (or filter) as the command line gives it.
    let entry = |m: &str| {
        let mut entry = json!({"module": m, "params": params});
        if let Some(f) = on_failure {
            entry["on_failure"] = json!(f);
        }
        if policies {
            entry["rooms"] = json!(rooms);
            entry["tenant"] = json!(for_tenants);
            if let Some(c) = &class {
                entry["class"] = json!(c);
            }
        }
        entry
    };
    let set_key = if policies { "policies" } else { "filters" };
    let path = scope_path(&scope)?;
    let mut body: Value = match (file, module) {
        (Some(f), _) => {
            serde_json::from_slice(&std::fs::read(&f).with_context(|| format!("cannot read {}", f.display()))?)
                .with_context(|| format!("{} is not JSON", f.display()))?
        }
        (None, m) if remove => {
            if policies {
                let mut at = json!({"rooms": rooms, "tenant": for_tenants});
                if let Some(c) = &class {
                    at["class"] = json!(c);
                }
                json!({ "remove": at })
            } else {
                let Some(m) = m else {
                    bail!("name the filter to remove: its module")
                };
                json!({ "remove": {"module": m} })
            }
        }
        (None, Some(m)) if add => json!({ "add": entry(&m) }),
        (None, Some(m)) if replace => json!({ set_key: [entry(&m)] }),
        (None, Some(m)) => {
            // Alone or with the rest? Refuse to guess when the
            // active set has more than this one would replace.
            let kept = api.post(&path, json!({ "add": entry(&m), "dry_run": true })).await?;
            let alone = json!([entry(&m)]);
            let with_rest = &kept["set"][set_key];
            if normalized(with_rest) != normalized(&alone) {
                bail!(
                    "{scope} v{} has other {what}; deploying this one alone would drop them.\n  \
                     with --add (the rest kept):\n{}  with --replace (this one alone):\n{}",
                    s(&kept["based_on"]),
                    listing(with_rest),
                    listing(&alone),
                    what = if policies { "rules" } else { "filters" },
                );
            }
            json!({ set_key: alone })
        }
        (None, None) => bail!("name a module (sha256:<hex or prefix>, name@version, builtin:<name>) or --file"),
    };
    if dry_run {
        body["dry_run"] = json!(true);
        let v = api.post(&path, body).await?;
        api.show(&v, |v| {
            let set = &v["set"][set_key];
            let rooms: Vec<String> = v["rooms_changing"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            format!(
                "{scope} would be (from v{}):\n{}rooms changing on this edge: {}{}\n",
                s(&v["based_on"]),
                listing(set),
                s(&v["rooms_changing_total"]),
                if rooms.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", rooms.join(", "))
                }
            )
        });
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if percent > 0 {
        body["activate"] = json!(percent);
    }
    if let Some(n) = note {
        body["note"] = json!(n);
    }
    let v = api.post(&path, body).await?;
    api.show(&v, |v| {
        let d = &v["deployment"];
        format!(
            "{} v{} created; {}\n",
            s(&d["scope"]),
            s(&d["version"]),
            activation(&v["active"])
        )
    });
    Ok(std::process::ExitCode::SUCCESS)
}
