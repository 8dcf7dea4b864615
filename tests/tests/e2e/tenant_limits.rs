//! What one tenant-admin token can cost an edge, bounded (issue 21,
//! section 3): refused uploads leave no compiled code on disk, a slow
//! upload body holds no one's turn but its own and not for long, event
//! streams are capped per caller, and never-activated versions do not pile
//! up. Each limit is tested both ways: over it refused, under it served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;
use throng_tests::api::{Answer, Api};
use throng_tests::{OPERATOR_KEY, TestEdge};

fn with_admin(c: &mut throng_edge::Config) {
    c.admin = Some("127.0.0.1:0".parse().expect("addr"));
}

fn admin(edge: &TestEdge) -> SocketAddr {
    edge.edge.admin_addr().expect("admin")
}

fn tenant_token(edge: &TestEdge) -> String {
    edge.token("acme", "acme-admin", "tenant-admin", "*")
}

#[track_caller]
fn refused(a: &Answer, status: u16, code: &str) {
    assert_eq!((a.status, a.code()), (status, code), "{:#}", a.body);
}

/// Compiled modules in the edge's disk cache.
fn cached(edge: &TestEdge) -> Vec<String> {
    let dir = edge.config.cache_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".cwasm"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// On a090a11, 22 refusals in 48 s left 152 MB of compiled code in the
/// cache, outside any quota, for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_refused_after_compiling_leaves_no_compiled_code_behind() {
    let edge = TestEdge::start(with_admin).await;
    let acme = Api::new(admin(&edge), tenant_token(&edge));
    let filter = throng_guest_artifacts::FILTER_KEYWORDS;
    let before = cached(&edge);
    // Compiles, then refuses its (missing) params.
    let no = acme.upload(filter, "kw", "1", "message-filter", json!({})).await;
    refused(&no, 422, "module_refused");
    assert_eq!(no.body["error"]["field"], "configure", "{:#}", no.body);
    assert_eq!(cached(&edge), before, "a refused module's code stayed in the cache");
    // Stored, its code is kept: a restart or deployment finds it compiled.
    let yes = acme
        .upload(filter, "kw", "2", "message-filter", json!({"words": "x"}))
        .await;
    assert_eq!(yes.status, 201, "{:#}", yes.body);
    assert_eq!(cached(&edge).len(), before.len() + 1);
    edge.edge.shutdown().await;
}

/// An upload whose body comes a byte at a time, on a raw connection.
struct SlowUpload {
    stream: TcpStream,
}

impl SlowUpload {
    fn start(addr: SocketAddr, token: &str, name: &str) -> SlowUpload {
        let mut stream = TcpStream::connect(addr).expect("connect");
        let head = format!(
            "POST /v1/modules?name={name}&version=1&world=message-filter&params=%7B%7D HTTP/1.1\r\n\
             Host: edge\r\nAuthorization: Bearer {token}\r\nContent-Type: application/wasm\r\n\
             Content-Length: 100000\r\n\r\n\0"
        );
        stream.write_all(head.as_bytes()).expect("headers");
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        SlowUpload { stream }
    }

    /// Sends one more byte and reads whatever answer there is: the status
    /// code once the edge answered.
    fn tick(&mut self) -> Option<u16> {
        let _ = self.stream.write_all(b"a");
        let mut buf = [0u8; 512];
        match self.stream.read(&mut buf) {
            Ok(n) if n > 12 => std::str::from_utf8(&buf[9..12]).ok()?.parse().ok(),
            _ => None,
        }
    }
}

/// On a090a11 two slow bodies (1 byte every 2 s) took both upload slots:
/// the operator's own upload got 503 after 60 s. Now a tenant has one
/// upload at a time, operators have their own turns, and a body that has
/// not arrived within 30 s is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upload_bodies_hold_no_one_elses_turn_and_not_for_long() {
    let edge = TestEdge::start(with_admin).await;
    let addr = admin(&edge);
    let token = tenant_token(&edge);
    let mut first = SlowUpload::start(addr, &token, "slow-a");
    // Its turn is taken once its headers are read; give that a moment by
    // trickling (each tick reads for 200 ms).
    for _ in 0..5 {
        assert_eq!(first.tick(), None, "the first slow upload was answered at once");
    }
    let mut second = SlowUpload::start(addr, &token, "slow-b");
    let started = Instant::now();
    let mut answer = None;
    while answer.is_none() && started.elapsed() < Duration::from_secs(10) {
        answer = second.tick();
    }
    assert_eq!(
        answer,
        Some(403),
        "a second upload of the same tenant was not refused at once"
    );

    // The operator uploads while the tenant's body still trickles.
    let ops = Api::new(addr, OPERATOR_KEY);
    let t = Instant::now();
    let up = ops
        .upload(
            throng_guest_artifacts::FILTER_KEYWORDS,
            "kw",
            "1",
            "message-filter",
            json!({"words": "x"}),
        )
        .await;
    assert_eq!(up.status, 201, "{:#}", up.body);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the operator waited {:?}",
        t.elapsed()
    );

    // The slow body is refused within its deadline (and a margin).
    let mut answer = None;
    while answer.is_none() && started.elapsed() < Duration::from_secs(60) {
        answer = first.tick();
    }
    assert_eq!(answer, Some(400), "the slow body was not refused in time");
    // Its turn is free again: the tenant uploads.
    let acme = Api::new(addr, token);
    let ok = acme
        .upload(
            throng_guest_artifacts::FILTER_KEYWORDS,
            "kw",
            "2",
            "message-filter",
            json!({"words": "x"}),
        )
        .await;
    assert_eq!(ok.status, 201, "{:#}", ok.body);
    edge.edge.shutdown().await;
}

/// Opens `/v1/events` with `token` on a raw connection: its status code,
/// and the connection (the stream lives while it is open).
fn open_events(addr: SocketAddr, token: &str) -> (u16, TcpStream) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    let head = format!(
        "GET /v1/events HTTP/1.1\r\nHost: edge\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).expect("request");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut buf = [0u8; 12];
    stream.read_exact(&mut buf).expect("a status line");
    let status = std::str::from_utf8(&buf[9..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, stream)
}

/// On a090a11, 32 event streams took every admin connection and the
/// operator waited 61 s. Now a caller has at most two and all callers
/// eight, so the admin listener always has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_capped_per_caller_and_leave_the_admin_api_free() {
    let edge = TestEdge::start(with_admin).await;
    let addr = admin(&edge);
    let token = tenant_token(&edge);
    let (a, first) = open_events(addr, &token);
    let (b, _second) = open_events(addr, &token);
    assert_eq!((a, b), (200, 200), "under the cap");
    let (c, _third) = open_events(addr, &token);
    assert_eq!(c, 429, "a third stream of one caller");
    // Everyone else is served meanwhile.
    let ops = Api::new(addr, OPERATOR_KEY);
    assert_eq!(ops.get("/v1/overview").await.status, 200);
    let (o, _ops_stream) = open_events(addr, OPERATOR_KEY);
    assert_eq!(o, 200, "the operator's own stream");
    // A closed stream frees its place.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (again, _s) = open_events(addr, &token);
        if again == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the closed stream's place was never freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    edge.edge.shutdown().await;
}

/// On a090a11, 150 maximal deployments in 4 s grew `control.redb` by
/// 286 MB. A tenant's scope now holds at most 10 versions above its active
/// one; activating one makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_activated_versions_do_not_pile_up() {
    let edge = TestEdge::start(with_admin).await;
    let acme = Api::new(admin(&edge), tenant_token(&edge));
    let spec = json!({"filters": [{"module": "builtin:filter-keywords", "params": {"words": "a"}}]});
    for i in 0..10 {
        let d = acme.post("/v1/deployments/filters/acme", spec.clone()).await;
        assert_eq!(d.status, 201, "version {i}: {:#}", d.body);
    }
    let over = acme.post("/v1/deployments/filters/acme", spec.clone()).await;
    refused(&over, 403, "quota_exceeded");
    assert_eq!(over.body["error"]["field"], "pending_versions", "{:#}", over.body);
    let last = acme.get("/v1/deployments/filters/acme").await;
    let newest = last.body["versions"]
        .as_array()
        .and_then(|v| v.iter().filter_map(|d| d["version"].as_u64()).max())
        .expect("versions");
    let on = acme
        .post("/v1/deployments/filters/acme/activate", json!({"version": newest}))
        .await;
    assert!(on.status < 300, "{:#}", on.body);
    let again = acme.post("/v1/deployments/filters/acme", spec).await;
    assert_eq!(again.status, 201, "{:#}", again.body);
    edge.edge.shutdown().await;
}

/// `bytes` made distinct by a custom section named `tag` at the end: the
/// same module to run, another to compile (its hash is the cache's key).
/// `api` uploads the keywords filter made new by `tag` (words `x`).
async fn upload_keywords(api: &Api, tag: &str, version: &str) -> Answer {
    api.upload(
        &variant(throng_guest_artifacts::FILTER_KEYWORDS, tag),
        "kw",
        version,
        "message-filter",
        json!({"words": "x"}),
    )
    .await
}

fn variant(bytes: &[u8], tag: &str) -> Vec<u8> {
    let mut section = vec![u8::try_from(tag.len()).expect("short tag")];
    section.extend_from_slice(tag.as_bytes());
    let mut out = bytes.to_vec();
    out.push(0); // a custom section
    out.push(u8::try_from(section.len()).expect("short section"));
    out.extend_from_slice(&section);
    out
}

/// On a090a11, refused uploads could hold a core for as long as a tenant
/// kept sending them (22 in 48 s). Now a tenant's uploads have a compile
/// time per hour; past it, uploads are refused at once, before any
/// compile, while other tenants and operators upload as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_compile_time_per_hour_is_capped_and_others_compile_on() {
    let edge = TestEdge::start(|c| {
        with_admin(c);
        // Both tenants have the cap; globex has not used it.
        for q in c.control.tenant_quotas.values_mut() {
            q.compile_per_hour = Duration::from_millis(300);
        }
    })
    .await;
    let addr = admin(&edge);
    let acme = Api::new(addr, tenant_token(&edge));
    let filter = throng_guest_artifacts::FILTER_KEYWORDS;
    let mut compiled = 0;
    let mut refusal = None;
    for i in 0..150 {
        // Each compiles (a new hash), then is refused for its params.
        let a = acme
            .upload(
                &variant(filter, &format!("v{i}")),
                "kw",
                "1",
                "message-filter",
                json!({}),
            )
            .await;
        if a.status == 403 {
            refusal = Some(a);
            break;
        }
        refused(&a, 422, "module_refused");
        compiled += 1;
    }
    let refusal = refusal.expect("150 compiles of the tenant's were never capped");
    refused(&refusal, 403, "quota_exceeded");
    assert_eq!(refusal.body["error"]["field"], "compile_per_hour", "{:#}", refusal.body);
    assert!(compiled >= 1, "the first upload under the cap was refused");
    let message = refusal.body["error"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(
        message.contains("compiling") && message.contains("next may start in"),
        "{message}"
    );
    // Refused before compiling: nothing new in the cache either way.
    let cache = cached(&edge);
    let again = upload_keywords(&acme, "after", "2").await;
    refused(&again, 403, "quota_exceeded");
    assert_eq!(cached(&edge), cache);

    // Another tenant, and an operator, compile on.
    let globex = Api::new(addr, edge.token("globex", "g", "tenant-admin", "*"));
    let theirs = upload_keywords(&globex, "globex", "1").await;
    assert_eq!(theirs.status, 201, "{:#}", theirs.body);
    let ops = Api::new(addr, OPERATOR_KEY);
    let up = upload_keywords(&ops, "ops", "1").await;
    assert_eq!(up.status, 201, "{:#}", up.body);
    edge.edge.shutdown().await;
}

/// What a tenant's stored modules take on an edge, their compiled code
/// included, is bounded (`max_stored_bytes`): on a090a11 compiled code was
/// outside every quota. Under the bound uploads are stored; the one that
/// would pass it is refused, its compiled code removed, and nothing stored
/// before is lost; another tenant uploads on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_stored_and_compiled_modules_are_bounded_and_nothing_under_the_bound_is_lost() {
    let edge = TestEdge::start(with_admin).await;
    let addr = admin(&edge);
    let acme = Api::new(addr, tenant_token(&edge));
    let upload = |tag: &'static str| upload_keywords(&acme, tag, tag);
    let first = upload("a").await;
    assert_eq!(first.status, 201, "{:#}", first.body);
    let size = first.body["module"]["size"].as_u64().expect("size");
    let compiled = first.body["module"]["compiled_size"].as_u64().expect("compiled_size");
    assert!(compiled > 0, "the record counts its compiled code: {:#}", first.body);
    assert!(cached(&edge).len() == 1, "compiled into the cache: {:?}", cached(&edge));

    // Room for two such modules, not three.
    let each = size + compiled;
    let mut config = edge.config.clone();
    let mut quota = config.control.quota_of("acme").clone();
    quota.max_stored_bytes = 2 * each + each / 2;
    config.control.tenant_quotas.insert("acme".into(), quota);
    edge.edge.reload(&config).await.expect("the reload");

    let second = upload("b").await;
    assert_eq!(second.status, 201, "under the bound: {:#}", second.body);
    let before = cached(&edge);
    let third = upload("c").await;
    refused(&third, 403, "quota_exceeded");
    assert_eq!(third.body["error"]["field"], "max_stored_bytes", "{:#}", third.body);
    let message = third.body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("stored and compiled"), "{message}");
    assert_eq!(cached(&edge), before, "the refused module's compiled code is gone");

    // Nothing under the bound was lost.
    let listed = acme.get("/v1/modules").await;
    let versions: Vec<&str> = listed
        .body
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|m| m["version"].as_str())
        .collect();
    assert_eq!(versions.len(), 2, "{:#}", listed.body);
    assert!(versions.contains(&"a") && versions.contains(&"b"), "{versions:?}");

    // Another tenant's bound is its own.
    let globex = Api::new(addr, edge.token("globex", "g", "tenant-admin", "*"));
    let theirs = upload_keywords(&globex, "g", "1").await;
    assert_eq!(theirs.status, 201, "{:#}", theirs.body);
    edge.edge.shutdown().await;
}
