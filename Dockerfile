# syntax=docker/dockerfile:1
# The ballot binary and nothing else. The default components are embedded,
# so the build needs no wasm toolchain.
#   docker build -t ballot .
#   docker compose -f deploy/compose.yaml up
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ballot \
    && install -m 0755 target/release/ballot /ballot

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 ballot \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/ballot ballot \
    && mkdir -p /var/lib/ballot /etc/ballot \
    && chown ballot:ballot /var/lib/ballot
COPY --from=build /ballot /usr/local/bin/ballot
USER 10001:10001
WORKDIR /var/lib/ballot
VOLUME ["/var/lib/ballot"]
# QUIC between replicas, HTTP for clients and metrics.
EXPOSE 7001/udp 8001/tcp
ENTRYPOINT ["/usr/local/bin/ballot"]
CMD ["serve", "--config", "/etc/ballot/node.toml"]
