//! A plain pingora pass-through: the same pingora version and the same hosting as the
//! gated proxy (`proxy::server::serve_pingora`), forwarding every request to the upstream
//! named by its first argument, on one worker thread. Prints `listening on <addr>`.

#![allow(clippy::print_stdout)]

/// The gated proxy's allocator, so the two differ only in the gate.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;

use async_trait::async_trait;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};

struct PassThrough {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for PassThrough {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() -> anyhow::Result<()> {
    let upstream = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: e2e-passthrough <upstream host:port>"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listening on {}", listener.local_addr()?);
        let conf = Arc::new(pingora::server::configuration::ServerConf::default());
        let app = Arc::new(pingora::proxy::http_proxy(&conf, PassThrough { upstream }));
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        proxy::server::serve_pingora(listener, app, Arc::default(), stopped).await;
        Ok(())
    })
}
