//! The end-to-end harness: a control plane (SQLite file, real socket), a demo upstream and
//! proxies, all on port 0, driven over HTTP like a user would. Waiting is always polling a
//! condition with a deadline, never a guessed sleep.

// Test support: a failed setup step should panic with its reason.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod bench;

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Polls `check` until it returns `Some`, or panics naming `what` after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A control plane serving on a real socket over a SQLite file.
#[derive(Debug)]
pub struct ControlPlane {
    pub address: SocketAddr,
    pub url: String,
    /// The tenant's sandbox key (all scopes).
    pub key: String,
    /// The tenant's live key (all scopes), where this control plane created the tenant.
    pub live_key: Option<String>,
    pub client: client::Client,
    database: control_plane::config::DatabaseUrl,
    /// Where it publishes the feed on NATS, if anywhere.
    nats: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ControlPlane {
    /// Starts a control plane on a new database in `dir` with a tenant and a small catalog:
    /// metered `api_calls` and `tokens` (1 credit a unit), open to everyone.
    pub async fn start(dir: &Path) -> ControlPlane {
        let mut plane = ControlPlane::start_empty(dir).await;
        let qs = &plane.client;
        for key in ["api_calls", "tokens"] {
            qs.create_feature(&from(json!({"key": key, "name": key, "type": "metered"})))
                .await
                .expect("feature");
        }
        plane.client = qs.clone();
        plane
    }

    /// Starts a control plane on a new database in `dir` with a tenant and no catalog.
    pub async fn start_empty(dir: &Path) -> ControlPlane {
        let database = control_plane::config::DatabaseUrl::SqliteFile(
            dir.join("control-plane.db").display().to_string(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        ControlPlane::serve(listener, database, None, None).await
    }

    /// [`ControlPlane::start`], publishing the change feed to the NATS server at `nats`
    /// too (`sync.nats_url`).
    pub async fn start_publishing(dir: &Path, nats: &str) -> ControlPlane {
        let database = control_plane::config::DatabaseUrl::SqliteFile(
            dir.join("control-plane.db").display().to_string(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let plane = ControlPlane::serve(listener, database, None, Some(nats.to_owned())).await;
        for key in ["api_calls", "tokens"] {
            plane
                .client
                .create_feature(&from(json!({"key": key, "name": key, "type": "metered"})))
                .await
                .expect("feature");
        }
        plane
    }

    /// Starts a control plane on `database` (a PostgreSQL URL, say): with a new tenant
    /// when `key` is `None`, else serving the tenant `key` belongs to (a second replica).
    pub async fn start_on(
        database: control_plane::config::DatabaseUrl,
        key: Option<String>,
    ) -> ControlPlane {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        ControlPlane::serve(listener, database, key, None).await
    }

    async fn serve(
        listener: TcpListener,
        database: control_plane::config::DatabaseUrl,
        key: Option<String>,
        nats: Option<String>,
    ) -> ControlPlane {
        let address = listener.local_addr().expect("address");
        let mut config = control_plane::config::Config::for_tests();
        config.database = database.clone();
        config.listen = address;
        config.rate_limit_per_second = 1_000_000;
        config.rate_limit_burst = 1_000_000;
        config.nats_url = nats.clone().map(control_plane::config::Secret::new);
        let store = control_plane::open_store(&config).await.expect("store");
        let state = control_plane::state(
            config,
            store,
            Arc::new(control_plane::clock::SystemClock),
            None,
        );
        let (key, live_key) = match key {
            Some(key) => (key, None),
            None => {
                let keys = control_plane::http::tenancy::create_tenant(&state, "e2e")
                    .await
                    .expect("tenant")
                    .api_keys;
                (keys.test, Some(keys.live))
            }
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = control_plane::run(state, listener, async move {
                let _ = stopped.await;
            })
            .await;
            if let Err(error) = served {
                panic!("control plane failed: {error}");
            }
        });
        let url = format!("http://{address}");
        let client = client::Client::new(&url, &key).expect("client");
        ControlPlane {
            address,
            url,
            key,
            live_key,
            client,
            database,
            nats,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops serving (connections close; the database stays).
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    /// Serves again on the same address and database.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = eventually(
            "the old address to be free",
            Duration::from_secs(10),
            || async { TcpListener::bind(self.address).await.ok() },
        )
        .await;
        let again = ControlPlane::serve(
            listener,
            self.database.clone(),
            Some(self.key.clone()),
            self.nats.clone(),
        )
        .await;
        *self = again;
    }

    pub async fn grant(&self, end_user: &str, amount: i64) {
        self.client
            .grant(&from(json!({"end_user_id": end_user, "amount": amount})))
            .await
            .expect("grant");
    }

    pub async fn available(&self, end_user: &str) -> i64 {
        self.client
            .balance(end_user, None)
            .await
            .expect("balance")
            .available
    }

    /// The end user's ledger entries of one type.
    pub async fn entries(&self, end_user: &str, entry_type: &str) -> Vec<protocol::LedgerEntry> {
        entries_of(&self.client, end_user, entry_type).await
    }
}

/// `end_user`'s ledger entries of one type, through `client`.
pub async fn entries_of(
    client: &client::Client,
    end_user: &str,
    entry_type: &str,
) -> Vec<protocol::LedgerEntry> {
    let mut all = Vec::new();
    let mut cursor = None;
    loop {
        let page = client
            .ledger(&client::LedgerOptions {
                end_user_id: Some(end_user.to_owned()),
                entry_type: Some(entry_type.to_owned()),
                cursor: cursor.clone(),
                limit: Some(500),
                ..client::LedgerOptions::default()
            })
            .await
            .expect("ledger");
        let done = page.data.is_empty() || page.next_cursor.is_none();
        all.extend(page.data);
        if done {
            return all;
        }
        cursor = page.next_cursor;
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Builds a protocol type from JSON (tests only).
pub fn from<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a valid request body")
}

/// A tiny upstream: `/work` answers 200, `/fail` 500, `/generate` 200 with
/// `x-usage-units` copied from the request's `x-test-actual`, `/health` 200. Any other
/// path echoes what reached it ([`Echo`]: the path, the query and every
/// `x-end-user-id` value), also with `x-usage-units` from `x-test-actual`.
#[derive(Debug)]
pub struct Upstream {
    pub address: SocketAddr,
    task: JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        async fn generate(headers: HeaderMap) -> impl IntoResponse {
            let mut answer = HeaderMap::new();
            if let Some(actual) = headers.get("x-test-actual") {
                answer.insert("x-usage-units", actual.clone());
            }
            (StatusCode::OK, answer, "generated")
        }
        async fn echo(uri: axum::http::Uri, headers: HeaderMap) -> impl IntoResponse {
            let mut answer = HeaderMap::new();
            if let Some(actual) = headers.get("x-test-actual") {
                answer.insert("x-usage-units", actual.clone());
            }
            let echo = Echo {
                path: uri.path().to_owned(),
                query: uri.query().map(str::to_owned),
                end_user_ids: headers
                    .get_all("x-end-user-id")
                    .iter()
                    .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
                    .collect(),
            };
            (StatusCode::OK, answer, axum::Json(echo))
        }
        let app = axum::Router::new()
            .route("/work", axum::routing::any(|| async { "done" }))
            .route("/work/{*rest}", axum::routing::any(|| async { "done" }))
            .route("/closed", axum::routing::any(|| async { "done" }))
            .route("/health", axum::routing::get(|| async { "healthy" }))
            .route(
                "/upload",
                axum::routing::post(
                    |body: String| async move { format!("got {} bytes", body.len()) },
                ),
            )
            .route(
                "/fail",
                axum::routing::any(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "broken") }),
            )
            .route("/generate", axum::routing::any(generate))
            .route(
                "/generate-fail",
                axum::routing::any(|| async { (StatusCode::BAD_GATEWAY, "model down") }),
            )
            .fallback(echo);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream { address, task }
    }
}

/// What reached the upstream's echoing paths.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Echo {
    pub path: String,
    pub query: Option<String>,
    /// Every `x-end-user-id` header the upstream received, in order.
    pub end_user_ids: Vec<String>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The routes most tests use.
pub const ROUTES: &str = r#"
[[routes]]
path = "/health"
public = true

[[routes]]
path = "/work"
feature = "api_calls"

[[routes]]
path = "/fail"
feature = "api_calls"

[[routes]]
path = "/upload"
feature = "api_calls"

[[routes]]
path = "/closed"
feature = "api_calls"
on_unavailable = "closed"

[[routes]]
path = "/generate"
feature = "tokens"
reserve = { estimate = 100, actual_header = "x-usage-units" }

[[routes]]
path = "/generate-fail"
feature = "tokens"
reserve = { estimate = 100 }
"#;

/// A proxy configuration for `plane` in front of the API at `upstream`, with `extra`
/// TOML appended (routes, failure policy).
pub fn proxy_config(
    plane: &ControlPlane,
    upstream: SocketAddr,
    data_dir: &Path,
    extra: &str,
) -> String {
    proxy_config_for(&plane.url, &plane.key, upstream, data_dir, extra)
}

/// [`proxy_config`] for a control plane known by its URL and key.
pub fn proxy_config_for(
    url: &str,
    key: &str,
    upstream: SocketAddr,
    data_dir: &Path,
    extra: &str,
) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
upstream = "{upstream}"
data_dir = "{data_dir}"
cache_mb = 8

[control_plane]
url = "{url}"
api_key = "{key}"

{usage}
{leases}
{extra}
"#,
        data_dir = data_dir.display(),
        // Shipped often so tests see usage arrive quickly; a test with usage settings of
        // its own writes the whole table.
        usage = if extra.contains("[usage]") {
            ""
        } else {
            "[usage]\nship_interval_ms = 50\n"
        },
        // Correctness tests run many proxies and a control plane on two cores in a debug
        // build: a lease's refill may take longer than production's 100 ms there. A test
        // with lease settings of its own writes the whole table.
        leases = if extra.contains("[leases]") {
            ""
        } else {
            "[leases]\nwait_ms = 5000\nreport_interval_ms = 2000\n"
        },
    )
}

/// A proxy in this process.
#[derive(Debug)]
pub struct Proxy {
    pub running: proxy::Running,
    pub url: String,
    pub http: reqwest::Client,
}

impl Proxy {
    pub async fn start(config_text: &str) -> Proxy {
        let config = proxy::Config::parse(config_text).expect("proxy config parses");
        let running = proxy::start(config, None).await.expect("proxy starts");
        let url = format!("http://{}", running.address);
        Proxy {
            running,
            url,
            http: http_client(),
        }
    }

    /// Waits until the replica has its snapshot and is fresh.
    pub async fn ready(&self) {
        eventually(
            "the proxy's replica to load",
            Duration::from_secs(20),
            || async {
                (self.running.replica.freshness(Duration::from_secs(30))
                    == proxy::replica::Freshness::Fresh)
                    .then_some(())
            },
        )
        .await;
    }

    /// Waits until the replica holds `end_user` (a grant made at the control plane
    /// reached this proxy).
    pub async fn sees(&self, end_user: &str) {
        let id = ledger::EndUserId::new(end_user).expect("an end user id");
        eventually(
            &format!("{end_user} to reach the proxy"),
            Duration::from_secs(10),
            || async { self.running.replica.version(&id).is_some().then_some(()) },
        )
        .await;
    }

    /// Sends a request as `end_user` (`None`: no identity).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        end_user: Option<&str>,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        send(&self.http, &self.url, method, path, end_user, headers).await
    }

    /// Waits until the outbox's records are acknowledged (lease spend aside).
    pub async fn drained_outbox(&self) {
        eventually("the outbox to drain", Duration::from_secs(20), || async {
            (self.running.outbox.depth() == 0).then_some(())
        })
        .await;
    }

    /// Waits until the outbox is empty.
    pub async fn drained(&self) {
        eventually("the outbox to drain", Duration::from_secs(20), || async {
            (proxy::server::unacknowledged(&self.running.outbox, &self.running.spend_log) == 0)
                .then_some(())
        })
        .await;
    }
}

/// Credits charged to `end_user` in all: debits (usage) and commits (reservations and
/// lease reports).
pub async fn charged(plane: &ControlPlane, end_user: &str) -> i64 {
    charged_via(&plane.client, end_user).await
}

/// [`charged`] through any client (a control plane run as a process, say).
pub async fn charged_via(client: &client::Client, end_user: &str) -> i64 {
    let mut total = 0i64;
    for entry_type in ["debit", "commit"] {
        for entry in entries_of(client, end_user, entry_type).await {
            total += entry.amount;
        }
    }
    total
}

/// The `x-quota-balance` a proxy's answer carries.
pub fn balance_header(response: &reqwest::Response) -> i64 {
    response.headers()["x-quota-balance"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("a number")
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client")
}

pub async fn send(
    http: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    end_user: Option<&str>,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = http.request(method, format!("{base}{path}"));
    if let Some(end_user) = end_user {
        request = request.header("x-end-user-id", end_user);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("the proxy answers")
}

/// An answer read by [`raw_request`].
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "{error}: {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Sends one HTTP/1.1 request with the request target exactly as given (an HTTP client
/// library would resolve `.`/`..` and re-encode it first) and reads the whole answer
/// (`Connection: close`; a chunked body is decoded).
pub async fn raw_request(
    address: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> RawResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let mut request =
        format!("{method} {target} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if method != "GET" && method != "HEAD" {
        request.push_str("Content-Length: 0\r\n");
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("request sent");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
        .await
        .expect("an answer within 20 s")
        .expect("answer read");
    let split = answer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let mut body = answer[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(name, value)| name == "transfer-encoding" && value.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    RawResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut chunked: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = chunked
            .windows(2)
            .position(|window| window == b"\r\n")
            .expect("a chunk size line");
        let size_text = String::from_utf8_lossy(&chunked[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("a hex chunk size");
        chunked = &chunked[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&chunked[..size]);
        chunked = &chunked[size + 2..];
    }
}

/// The proxy's command line running as a child process. Dropping it kills (SIGKILL) and
/// reaps the child, so a failing test never leaves a proxy behind; and the child writes
/// only to pipes this process drains, never to the test runner's own output, which a
/// stray child would otherwise hold open (a CI step piping the tests through `tee` would
/// wait for it forever).
#[derive(Debug)]
pub struct ProxyProcess {
    child: Child,
    /// `http://` address of the proxy's listener.
    pub address: String,
    /// `http://` address of its admin endpoints.
    pub admin: String,
}

impl ProxyProcess {
    /// Starts `binary` (the `e2e-proxy` copy, from a test's
    /// `env!("CARGO_BIN_EXE_e2e-proxy")`) on `config` and reads the addresses it prints.
    pub fn spawn(binary: &str, config: &Path) -> ProxyProcess {
        let mut command = Command::new(binary);
        command.arg("--config").arg(config).env("QS_LOG", "warn");
        let (child, printed) = spawn_reading(
            command,
            "proxy",
            &[
                "QuotaStack proxy listening on ",
                "admin (healthz, readyz, metrics) on ",
            ],
        );
        let [address, admin] = printed;
        ProxyProcess {
            child,
            address,
            admin,
        }
    }

    /// The child's process id (to send it signals).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Stops the child with SIGTERM (a graceful shutdown: in-flight requests finish,
    /// usage is reported, leases are released) and waits for it to exit.
    pub fn terminate(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "SIGTERM sent");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self.child.try_wait().expect("child status").is_some() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the proxy did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the child with SIGKILL and waits for it to exit.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    /// The outbox depth its admin endpoint reports (`None` while it does not answer).
    pub async fn outbox_depth(&self, http: &reqwest::Client) -> Option<u64> {
        self.metric(http, "qs_proxy_outbox_depth").await
    }

    /// A metric without labels from its admin endpoint, as a whole number (`None` while
    /// it does not answer or does not show the metric yet).
    pub async fn metric(&self, http: &reqwest::Client, name: &str) -> Option<u64> {
        let text = http
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .and_then(|value| format!("{value:.0}").parse().ok())
    }

    /// Waits until everything admitted so far has been shipped and acknowledged.
    pub async fn drained(&self, http: &reqwest::Client) {
        eventually("the outbox to drain", Duration::from_secs(30), || async {
            (self.outbox_depth(http).await == Some(0)).then_some(())
        })
        .await;
    }
}

/// Starts `command` with its output drained on threads of their own (its stderr shown
/// through this process's, tagged `name`) and waits up to 30 s for it to print a line
/// starting with each of `prefixes`: answers what follows each.
fn spawn_reading<const N: usize>(
    mut command: Command,
    name: &'static str,
    prefixes: &[&str; N],
) -> (Child, [String; N]) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    // Killed on every way out below: a panic must not leave it running.
    struct Guard(Option<Child>);
    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some(child) = self.0.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let stderr = child.stderr.take().expect("stderr");
    let stdout = child.stdout.take().expect("stdout");
    let mut guard = Guard(Some(child));
    // Its warnings still show, through this process's stderr.
    std::thread::spawn(move || drain_lines(stderr, |line| eprintln!("[{name}] {line}")));
    // Its stdout is read on a thread that hands the lines over, so that waiting for the
    // lines has a deadline; it keeps draining after, so the child never blocks on a full
    // pipe.
    let (lines, printed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drain_lines(stdout, |line| {
            // The test may have stopped listening; draining goes on regardless.
            let _ = lines.send(line.to_owned());
        });
    });
    let mut found: [String; N] = std::array::from_fn(|_| String::new());
    let deadline = Instant::now() + Duration::from_secs(30);
    while found.iter().any(String::is_empty) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = printed
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("the {name} prints its addresses within 30 s"));
        for (prefix, value) in prefixes.iter().zip(found.iter_mut()) {
            if let Some(rest) = line.strip_prefix(prefix) {
                rest.trim().clone_into(value);
            }
        }
    }
    (guard.0.take().expect("the child"), found)
}

/// A control plane run as a process of its own (the `e2e-control-plane` copy of
/// `quotastack-control-plane`), on a port it picks.
#[derive(Debug)]
pub struct ControlPlaneProcess {
    child: Child,
    /// `http://` address it serves on.
    pub url: String,
}

impl ControlPlaneProcess {
    /// The child's process id (its CPU time, signals).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Starts `binary` (a test's `env!("CARGO_BIN_EXE_e2e-control-plane")`) with the
    /// configuration file `config` on `database_url`.
    pub fn spawn(binary: &str, config: &Path, database_url: &str) -> ControlPlaneProcess {
        let mut command = Command::new(binary);
        command
            .env("QS_CONFIG", config)
            .env("QS_DATABASE_URL", database_url)
            .env("QS_LISTEN", "127.0.0.1:0")
            .env("QS_LOG_LEVEL", "warn")
            .arg("serve");
        let (child, [url]) = spawn_reading(
            command,
            "control plane",
            &["QuotaStack control plane listening on "],
        );
        ControlPlaneProcess { child, url }
    }

    /// Kills it with SIGKILL and waits for it to exit.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }
}

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `pipe` to its end, handing each line (trimmed) to `each`. Read as bytes: a line
/// that is not UTF-8 must not stop the draining.
fn drain_lines(pipe: impl std::io::Read, mut each: impl FnMut(&str)) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    while reader
        .read_until(b'\n', &mut line)
        .is_ok_and(|read| read > 0)
    {
        each(String::from_utf8_lossy(&line).trim());
        line.clear();
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        // Already exited (killed by the test) is fine.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
