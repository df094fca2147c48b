# The proxy, to run as a sidecar beside your API. Build from the repository root:
#   docker build -f deploy/proxy.Dockerfile -t quotastack-proxy .
# Mount your own proxy.toml (routes) at /etc/quotastack/proxy.toml and a volume at /data
# (the replica and the usage outbox: keep it across restarts, one proxy per volume).
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p proxy

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data quotastack && mkdir -p /data && chown quotastack /data
COPY --from=build /src/target/release/quotastack-proxy /usr/local/bin/
COPY config/proxy.toml /etc/quotastack/proxy.toml
USER quotastack
WORKDIR /data
ENV QS_PROXY_LISTEN=0.0.0.0:8081 \
    QS_PROXY_ADMIN_LISTEN=0.0.0.0:9091 \
    QS_PROXY_DATA_DIR=/data/proxy
EXPOSE 8081 9091
VOLUME ["/data"]
ENTRYPOINT ["quotastack-proxy", "--config", "/etc/quotastack/proxy.toml"]
