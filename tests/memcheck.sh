#!/usr/bin/env bash
# Runs the release daemon under valgrind memcheck through a short end-to-end run, in stub mode
# and in NATS mode (nats-server on a free loopback port and the Router double), and passes only
# if valgrind reports no error and no byte "definitely" or "indirectly" lost.
#
# Each case: the daemon starts under valgrind; ipc-gateway-bench sends pipelined requests for
# MEMCHECK_LOAD_SECS (thousands of them, even at valgrind's pace); ipc-gateway-stress leak
# churns for MEMCHECK_CHURN_SECS (clients that leave mid-flight, timeouts, late replies,
# partial frames, the output cap, bad frames, reconnects); then SIGTERM, and the daemon must
# drain and exit 0. Valgrind slows the daemon 20-50 times: the deadlines given to it and every
# readiness wait here have slack for that. tests/memcheck.supp suppresses the false positives
# found in the optimised code (each one explained there); the summary shows how many.
#
#   tests/memcheck.sh            # both cases
#   tests/memcheck.sh stub       # one case: stub or nats
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

LOAD_SECS=${MEMCHECK_LOAD_SECS:-5}
CHURN_SECS=${MEMCHECK_CHURN_SECS:-15}
# valgrind's exit status when it found an error (leaks of the kinds below count as errors).
VG_ERROR_EXIT=97
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(stub nats)

if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
need=()
command -v valgrind >/dev/null || need+=(valgrind)
for c in "${cases[@]}"; do
    if [ "$c" = nats ] && ! command -v nats-server >/dev/null; then need+=(nats-server); fi
done
if [ ${#need[@]} -gt 0 ]; then
    $sudo apt-get update
    $sudo apt-get install -y "${need[@]}"
fi
valgrind --version

cargo build --release -p ipc-gateway -p ipc-gateway-tests
bin=${CARGO_TARGET_DIR:-target}/release
build_done=$SECONDS
echo "memcheck: build took $((build_done - start)) s"

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# wait_for WHAT SECONDS COMMAND...: polls COMMAND every 0.2 s until it succeeds.
wait_for() {
    local what=$1 limit=$2 waited=0
    shift 2
    until "$@"; do
        if [ "$waited" -ge $((limit * 5)) ]; then
            echo "memcheck: $what not ready after $limit s" >&2
            return 1
        fi
        sleep 0.2
        waited=$((waited + 1))
    done
}

alive() { kill -0 "$1" 2>/dev/null; }

# The figure after LABEL in valgrind's summary ("definitely lost: 1,234 bytes in 5 blocks"),
# 0 when the line is absent (valgrind prints no leak lines when nothing leaked).
lost_bytes() {
    local n
    n=$(grep -E "$1: [0-9,]+ bytes" "$2" | tail -1 | sed -E "s/.*$1: ([0-9,]+) bytes.*/\1/" | tr -d ,)
    echo "${n:-0}"
}

failed=0
run_case() {
    local name=$1
    local socket=$work/$name.sock log=$work/$name.daemon.log vglog=$work/$name.valgrind.log
    local env=(
        CGW_IPC_SOCKET_PATH="$socket" CGW_HTTP_ADDR=off
        CGW_IPC_TIMEOUT_MS=2000 CGW_IPC_READ_TIMEOUT_MS=2000 CGW_IPC_STUB_DELAY_MS=20
        CGW_IPC_MAX_UNSENT_BYTES=65536 CGW_IPC_DRAIN_MS=20000 CGW_IPC_BREAKER_FAILURES=1000000
    )
    local case_start=$SECONDS
    echo
    echo "== memcheck: $name mode =="
    if [ "$name" = nats ]; then
        # -p -1: nats-server picks a free port and says which in its log.
        nats-server -a 127.0.0.1 -p -1 >"$work/nats.log" 2>&1 &
        pids+=($!)
        wait_for nats-server 20 grep -q "Listening for client connections" "$work/nats.log"
        local port
        port=$(sed -nE 's/.*Listening for client connections on [0-9.]+:([0-9]+).*/\1/p' "$work/nats.log")
        "$bin/router-double" --url "nats://127.0.0.1:$port" >"$work/double.out" 2>&1 &
        pids+=($!)
        wait_for router-double 20 grep -q '^ready' "$work/double.out"
        env+=(CGW_IPC_NATS_ENABLE=1 CGW_IPC_NATS_URL="nats://127.0.0.1:$port")
    fi
    # MEMCHECK_VALGRIND_ARGS adds options, e.g. --track-origins=yes or --gen-suppressions=all.
    # shellcheck disable=SC2086
    env "${env[@]}" valgrind --tool=memcheck --leak-check=full ${MEMCHECK_VALGRIND_ARGS:-} \
        --suppressions=tests/memcheck.supp \
        --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect \
        --error-exitcode=$VG_ERROR_EXIT --log-file="$vglog" "$bin/ipc-gateway" 2>"$log" &
    local vg=$!
    pids+=($vg)
    # The socket file appears only once it listens (it is bound privately and renamed).
    wait_for "the daemon under valgrind" 120 test -S "$socket"
    if [ "$name" = nats ]; then
        wait_for "the daemon's NATS connection" 120 grep -q '"event":"nats_connected"' "$log"
    fi
    "$bin/ipc-gateway-bench" --socket "$socket" --no-echo --connections 8 --pipeline 16 \
        --payload-size 256 --warmup 0 --duration "$LOAD_SECS" | tee "$work/$name.bench.out" |
        grep -E "^RESULT|FAILED|STALLED" || true
    "$bin/ipc-gateway-stress" leak --socket "$socket" --pid "$vg" --secs "$CHURN_SECS" \
        --workers 4 --timeout-ms 2000 --read-timeout-ms 2000 --out "$work/$name" |
        grep -E "churn|requests|violations|VIOLATIONS|RESULT" || true
    alive "$vg" || { echo "memcheck: the daemon died under load" >&2; cat "$log" | tail -20; }
    kill -TERM "$vg" 2>/dev/null || true
    local status=0
    wait "$vg" || status=$?
    echo "--- valgrind summary ($name) ---"
    sed -nE '/HEAP SUMMARY/,$p' "$vglog" | sed -E 's/^==[0-9]+== ?//'
    local errors definite indirect
    errors=$(sed -nE 's/.*ERROR SUMMARY: ([0-9,]+) errors.*/\1/p' "$vglog" | tail -1 | tr -d ,)
    definite=$(lost_bytes "definitely lost" "$vglog")
    indirect=$(lost_bytes "indirectly lost" "$vglog")
    local requests
    requests=$(sed -nE 's/^RESULT .* requests=([0-9]+) .*/\1/p' "$work/$name.bench.out")
    echo "memcheck $name: daemon exit $status, errors ${errors:-?}, definitely lost $definite bytes," \
        "indirectly lost $indirect bytes; bench requests ${requests:-?}; $((SECONDS - case_start)) s"
    if [ "$status" != 0 ] || [ "${errors:-x}" != 0 ] || [ "$definite" != 0 ] || [ "$indirect" != 0 ]; then
        echo "memcheck $name: FAILED (full valgrind log below)"
        cat "$vglog"
        failed=1
    else
        echo "memcheck $name: passed"
    fi
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    pids=()
}

for c in "${cases[@]}"; do
    case $c in
        stub | nats) run_case "$c" ;;
        *) echo "memcheck: unknown case $c (stub or nats)" >&2; exit 2 ;;
    esac
done
echo
echo "memcheck: runs took $((SECONDS - build_done)) s, $((SECONDS - start)) s with the build"
exit "$failed"
