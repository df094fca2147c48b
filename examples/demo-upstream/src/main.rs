//! `demo-upstream`: a stand-in for a customer's API behind the proxy (routes in the
//! library). Listens on `DEMO_UPSTREAM_LISTEN` (default `127.0.0.1:8090`; port 0 picks
//! one) and prints the address it bound.

// A command-line program: printing its address is its job.
#![allow(clippy::print_stdout)]

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let listen =
        std::env::var("DEMO_UPSTREAM_LISTEN").unwrap_or_else(|_| "127.0.0.1:8090".to_owned());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!(
        "demo upstream listening on http://{}",
        listener.local_addr()?
    );
    axum::serve(listener, demo_upstream::app()).await
}
