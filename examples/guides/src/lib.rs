// Guides print what they do: that is their point; and each is one walk-through, read top
// to bottom, so its length is the story's.
#![allow(clippy::print_stdout, clippy::print_stderr, clippy::too_many_lines)]

//! Five integration guides, each a runnable program (`cargo run -p guides --bin <name>`)
//! and a test (`cargo test -p guides`): see `examples/guides/README.md`.
//!
//! Every guide integrates through the typed client (`client::Client`) the way a real
//! backend would. To run on its own, each starts what it needs in this process with
//! [`Sandbox`]: a fresh control plane on a temporary SQLite file with one tenant, and for
//! the guides that go through the proxy, the demo API with a proxy in front of it. Only
//! the guide modules are the integration; this file is scaffolding.

pub mod ai_chatbot;
pub mod api_platform;
pub mod dev_tool;
pub mod llm_wrapper;
pub mod saas_addon;

use anyhow::Context;
use serde::de::DeserializeOwned;

/// A control plane (and, when asked, the demo API behind a proxy) for one guide.
#[derive(Debug)]
pub struct Sandbox {
    /// The client, with the tenant's sandbox key (all scopes). A real backend would use a
    /// key with only the scopes it needs.
    pub api: client::Client,
    /// The control plane's URL.
    pub url: String,
    proxy: Option<e2e::Proxy>,
    upstream: Option<tokio::task::JoinHandle<()>>,
    _plane: e2e::ControlPlane,
    _dir: tempfile::TempDir,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(upstream) = self.upstream.take() {
            upstream.abort();
        }
    }
}

/// A response from the API behind the proxy.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Answer {
    /// A response header as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
    }
}

impl Sandbox {
    /// A fresh control plane with one tenant; with `routes` (proxy route TOML), also the
    /// demo API (`examples/demo-upstream`) with a proxy in front of it.
    ///
    /// # Errors
    /// When something cannot start.
    pub async fn start(routes: Option<&str>) -> anyhow::Result<Sandbox> {
        let dir = tempfile::tempdir()?;
        let plane = e2e::ControlPlane::start_empty(dir.path()).await;
        let mut sandbox = Sandbox {
            api: plane.client.clone(),
            url: plane.url.clone(),
            proxy: None,
            upstream: None,
            _plane: plane,
            _dir: dir,
        };
        if let Some(routes) = routes {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let upstream = listener.local_addr()?;
            sandbox.upstream = Some(tokio::spawn(async move {
                let _ = axum::serve(listener, demo_upstream::app()).await;
            }));
            let data_dir = sandbox._dir.path().join("proxy");
            let config = e2e::proxy_config(&sandbox._plane, upstream, &data_dir, routes);
            let proxy = e2e::Proxy::start(&config).await;
            proxy.ready().await;
            sandbox.proxy = Some(proxy);
        }
        Ok(sandbox)
    }

    /// Applies a catalog file's text (catalog as code), printing the plan.
    ///
    /// # Errors
    /// An invalid file, a refused plan, or an API error.
    pub async fn apply(&self, catalog: &str, origin: &str) -> anyhow::Result<()> {
        use control_plane::apply;
        let file = apply::CatalogFile::parse(catalog, origin)?;
        let plan = apply::plan(&file, &apply::current(&self.api).await?);
        for line in plan.to_string().lines() {
            println!("   {line}");
        }
        apply::execute(&self.api, &plan, |_| {}).await?;
        Ok(())
    }

    fn proxy(&self) -> anyhow::Result<&e2e::Proxy> {
        self.proxy
            .as_ref()
            .context("this guide's sandbox has no proxy")
    }

    /// Waits until the proxy's replica knows `end_user` (after a grant or subscription).
    ///
    /// # Errors
    /// Without a proxy.
    pub async fn proxy_sees(&self, end_user: &str) -> anyhow::Result<()> {
        self.proxy()?.sees(end_user).await;
        Ok(())
    }

    /// Calls the API through the proxy as `end_user`, with extra headers.
    ///
    /// # Errors
    /// Without a proxy, or when the proxy does not answer.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        end_user: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Answer> {
        let response = self
            .proxy()?
            .send(method, path, Some(end_user), headers)
            .await;
        Ok(Answer {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.text().await?,
        })
    }

    /// Waits until the proxy has shipped every usage event it recorded.
    ///
    /// # Errors
    /// Without a proxy.
    pub async fn usage_shipped(&self) -> anyhow::Result<()> {
        self.proxy()?.drained().await;
        Ok(())
    }

    /// Moves the sandbox environment's clock forward (every job due in between runs).
    ///
    /// # Errors
    /// An API error.
    pub async fn advance_hours(&self, hours: i64) -> anyhow::Result<()> {
        let seconds = hours
            .checked_mul(3600)
            .context("too many hours to advance")?;
        self.api
            .advance_test_clock(&body(serde_json::json!({ "seconds": seconds }))?)
            .await?;
        Ok(())
    }

    /// The environment's events of one type, oldest first.
    ///
    /// # Errors
    /// An API error.
    pub async fn events(&self, event_type: &str) -> anyhow::Result<Vec<protocol::Event>> {
        let page = self
            .api
            .list_events(&client::ListOptions {
                limit: Some(500),
                ..client::ListOptions::default()
            })
            .await?;
        Ok(page
            .data
            .into_iter()
            .filter(|event| event.event_type == event_type)
            .collect())
    }
}

/// A request body from its JSON form (the wire shape, as in the API guide).
///
/// # Errors
/// When the JSON is not a valid body of that type.
pub fn body<T: DeserializeOwned>(value: serde_json::Value) -> anyhow::Result<T> {
    serde_json::from_value(value).context("a request body")
}

/// An API time as RFC 3339 text.
pub fn when(time: &protocol::WireTime) -> String {
    serde_json::to_value(time)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Prints a guide's step.
pub fn step(text: &str) {
    println!("\n== {text}");
}

/// Prints a detail of the current step.
pub fn note(text: impl std::fmt::Display) {
    println!("   {text}");
}

/// Runs a guide as a program: a multi-threaded runtime, the guide, a clear failure.
pub fn main_for<F, Fut>(guide: F) -> std::process::ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start a runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(guide()) {
        Ok(()) => {
            println!("\nThe guide ran to the end.");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("\nThe guide failed: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
