#!/usr/bin/env bash
# Runs the whole default suite (tests/run-all.sh) N times in a row while a CPU hog keeps every
# core busy, and prints each failing test with how many runs it failed in. A test that fails
# here one run in five would fail one CI run in five: fix it at its cause, never with a retry.
#
#   tests/flake-hunt.sh 5          # five runs under the hog
#   FLAKE_HOG=0 tests/flake-hunt.sh 3   # without the hog
#
# Logs of every run stay in target/flake-hunt/run-K.log. Exit status: 0 when every run passed.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-5}
case $runs in
    '' | *[!0-9]*) echo "flake-hunt: the number of runs must be a whole number, not '$runs'" >&2; exit 2 ;;
esac
logs=target/flake-hunt
mkdir -p "$logs"
rm -f "$logs"/run-*.log

hog_pids=()
stop_hog() { [ ${#hog_pids[@]} -eq 0 ] || kill "${hog_pids[@]}" 2>/dev/null || true; }
trap stop_hog EXIT
if [ "${FLAKE_HOG:-1}" != 0 ]; then
    cores=$(nproc)
    if command -v stress-ng >/dev/null; then
        stress-ng --cpu "$cores" --quiet &
        hog_pids+=($!)
    else
        # Busy loops: one per core, the same load stress-ng --cpu would put on.
        for _ in $(seq "$cores"); do
            (while :; do :; done) &
            hog_pids+=($!)
        done
    fi
    echo "flake-hunt: CPU hog on $cores cores (pids ${hog_pids[*]})"
fi

failed_runs=0
for k in $(seq "$runs"); do
    start=$SECONDS
    if tests/run-all.sh >"$logs/run-$k.log" 2>&1; then
        echo "flake-hunt: run $k/$runs passed in $((SECONDS - start)) s"
    else
        failed_runs=$((failed_runs + 1))
        echo "flake-hunt: run $k/$runs FAILED in $((SECONDS - start)) s (log: $logs/run-$k.log)"
        grep -E '^test .* \.\.\. FAILED$|^error: test failed|panicked at' "$logs/run-$k.log" | head -20 | sed 's/^/    /'
    fi
done

echo
echo "flake-hunt: $failed_runs of $runs runs failed"
# One line per failing test: how many runs it failed in. cargo prints "test NAME ... FAILED"
# once per failure; a binary that crashed shows as "error: test failed, to rerun pass ...".
cat "$logs"/run-*.log |
    grep -E '^test .* \.\.\. FAILED$|^error: test failed, to rerun pass' |
    sed -E 's/^test (.*) \.\.\. FAILED$/\1/' | sort | uniq -c | sort -rn |
    sed 's/^/  failed in runs: /' || true
[ "$failed_runs" -eq 0 ]
