# The control plane. Build from the repository root:
#   docker build -f deploy/control-plane.Dockerfile -t quotastack-control-plane .
# Run (SQLite in a volume; use QS_DATABASE_URL=postgres://… for PostgreSQL):
#   docker run -p 8080:8080 -v qs-data:/data quotastack-control-plane
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p control-plane

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data quotastack && mkdir -p /data && chown quotastack /data
COPY --from=build /src/target/release/quotastack-control-plane /usr/local/bin/
COPY config/control-plane.toml /etc/quotastack/control-plane.toml
USER quotastack
WORKDIR /data
ENV QS_CONFIG=/etc/quotastack/control-plane.toml \
    QS_LISTEN=0.0.0.0:8080 \
    QS_DATABASE_URL=sqlite:///data/quotastack.db \
    QS_LOG_FORMAT=json
EXPOSE 8080
VOLUME ["/data"]
ENTRYPOINT ["quotastack-control-plane"]
CMD ["serve"]
