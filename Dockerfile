# The sse-gateway image: built from this workspace, run as an unprivileged user on
# debian:bookworm-slim, with nothing written to the root file system (it can be read-only).
#
#   docker build -t sse-gateway .
#   docker run --rm -p 8080:8080 -e SSEGW_REDIS_URL=redis://host:6379 --read-only sse-gateway
#
# Every flag of `sse-gateway --help` has an SSEGW_* environment variable; docs/configuration.md.

# cargo-chef splits the build in two: dependencies first (a layer that stays cached until
# Cargo.toml or Cargo.lock change), then the workspace's own crates.
FROM rust:1.95-slim-bookworm AS chef
RUN cargo install cargo-chef --version 0.1.78 --locked
WORKDIR /src

FROM chef AS plan
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=plan /src/recipe.json recipe.json
RUN cargo chef cook --release --locked -p sse-gateway --recipe-path recipe.json
COPY . .
# The release profile keeps line tables for profiling (`debug = 1`, 64 MB); the image takes the
# binary without them (9 MB), symbols kept so that a panic's backtrace still names functions.
RUN cargo build --release --locked -p sse-gateway \
    && mkdir /out \
    && strip --strip-debug -o /out/sse-gateway target/release/sse-gateway

# The same Debian release as the build stage, so the binary finds the glibc it was linked with.
FROM debian:bookworm-slim
# The system's CA roots: a rediss:// Redis signed by a public CA is verified against them when
# no --redis-ca-file is given.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric id, so that Kubernetes' runAsNonRoot can check it without a passwd lookup.
RUN groupadd --system --gid 10001 ssegw \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin ssegw
COPY --from=build /out/sse-gateway /usr/local/bin/sse-gateway
USER 10001:10001
ENV SSEGW_LISTEN=0.0.0.0:8080 \
    SSEGW_LOG_FORMAT=json
EXPOSE 8080
# The image has no curl: bash's /dev/tcp sends the request and `read` takes the status line, so
# the check needs no tool beyond the shell the base image already has. It asks /healthz (the
# process answers), not /readyz: an orchestrator that restarts unhealthy containers must not
# restart every replica while Redis is away. The port follows SSEGW_LISTEN.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${SSEGW_LISTEN##*:} && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && read -r -t 2 _ status _ <&3 && [ \"$status\" = 200 ]"]
# The gateway handles SIGTERM itself (it drains over SSEGW_DRAIN_WINDOW): keep the stop timeout
# (`docker stop -t`, compose's stop_grace_period) longer than that window.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sse-gateway"]
