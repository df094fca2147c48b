//! The benchmarks' upstream: answers every request with a small body, on one thread.
//! Listens on 127.0.0.1:0 and prints `listening on <addr>`.

#![allow(clippy::print_stdout)]

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let app = axum::Router::new().fallback(|| async { "ok" });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await
}
