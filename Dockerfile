# syntax=docker/dockerfile:1
#
# chat-delete-worker: build with the Rust toolchain, run on a slim Debian with only CA certificates.
#   docker build -t chat-delete-worker .
#   docker run --rm -v "$PWD/deploy/config.toml:/etc/chat-delete-worker/config.toml:ro" \
#     -e CHAT_DELETE_WORKER_CONFIG=/etc/chat-delete-worker/config.toml -p 9090:9090 chat-delete-worker

############################ builder ############################
FROM rust:1-bookworm AS builder

# cmake: some native dependencies (aws-lc-sys via the S3 client's TLS stack) may ask for it.
# SQLite is compiled in (bundled) by the WhatsApp session store, so the runtime needs no libsqlite3.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# 1. Dependencies only, in their own layer: it is rebuilt only when Cargo.toml or Cargo.lock
#    change, not on every source edit. Every target file that Cargo.toml names explicitly gets a
#    stub, so the manifest loads even if it later declares benches or tests.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && for p in $(sed -n 's/^path *= *"\([^"]*\.rs\)".*/\1/p' Cargo.toml); do \
        [ -f "$p" ] || { mkdir -p "$(dirname "$p")"; echo 'fn main() {}' > "$p"; }; \
    done \
 && cargo build --release --locked --bin chat-delete-worker \
 && rm -rf src target/release/chat-delete-worker* \
           target/release/deps/chat_delete_worker-* target/release/deps/libchat_delete_worker-* \
           target/release/.fingerprint/chat-delete-worker-*

# 2. The real sources. COPY keeps the files' own mtimes, which may be older than the stubs above:
#    touch them so that cargo does not take the stub build for up to date.
COPY src ./src
RUN find src -type f -exec touch {} + \
 && cargo build --release --locked --bin chat-delete-worker \
 && install -m 0755 target/release/chat-delete-worker /usr/local/bin/chat-delete-worker

############################ runtime ############################
FROM debian:bookworm-slim

# ca-certificates: amqps:// and S3 over TLS use rustls with the system's root certificates.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged uid/gid so that volume ownership is predictable across rebuilds.
RUN groupadd --system --gid 10001 cdw \
 && useradd --system --uid 10001 --gid cdw --home-dir /data --no-create-home \
            --shell /usr/sbin/nologin cdw \
 && mkdir -p /data /etc/chat-delete-worker \
 && chown cdw:cdw /data

COPY --from=builder /usr/local/bin/chat-delete-worker /usr/local/bin/chat-delete-worker

# The worker's own files (idempotency store, WhatsApp sessions, local media): relative paths in the
# config resolve under /data, which is a volume so they survive a new container.
WORKDIR /data
VOLUME ["/data"]

USER cdw:cdw

# /metrics, /healthz and /readyz.
EXPOSE 9090

ENTRYPOINT ["chat-delete-worker"]
CMD ["run"]
