# The demo upstream (examples/demo-upstream), standing in for your API in docker-compose.yml.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
RUN cargo build --release --locked -p demo-upstream

FROM debian:bookworm-slim
COPY --from=build /src/target/release/demo-upstream /usr/local/bin/
ENTRYPOINT ["demo-upstream"]
