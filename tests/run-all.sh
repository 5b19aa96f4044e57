#!/usr/bin/env bash
# Installs what the tests need and runs every test of the workspace: core unit and property
# tests, the fuzz-corpus replay, the runtime's tests, the simulations, and the black-box tests
# that start the real daemon on temporary sockets.
#
# Long sweeps stay off by default; see README.md ("Tests") for the variables that enable them.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "run-all: cargo is not installed (https://rustup.rs)" >&2
    exit 1
fi

# The NATS tests start real nats-server processes on free loopback ports (Debian's package).
if ! command -v nats-server >/dev/null; then
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update
    $sudo apt-get install -y nats-server
fi
nats-server --version

# The black-box tests build the daemon themselves (cargo build -p ipc-gateway); building it
# here first keeps their first test from paying for the compile inside its timeout.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast

# The loom models of the resolver's thread hand-off (runtime/src/handoff.rs; design.md
# section 5). `--cfg loom` changes every crate's flags, so they build in their own target
# directory and leave the main build's cache alone.
CARGO_TARGET_DIR=target/loom RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 \
    cargo test -p ipc-gateway --release handoff::loom_tests
