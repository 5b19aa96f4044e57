#!/usr/bin/env bash
# bench-compare.sh BASE_REV [bench args...]
#
# Before/after figures of the daemon in one run. Builds the release `ipc-gateway` and
# `ipc-gateway-bench` at BASE_REV and at HEAD (each in a temporary git worktree under
# target/bench-compare/, removed again), then runs the stub bench and the NATS bench
# alternately, base and head, round after round (base first in odd rounds, head first in even
# ones), so that whatever else the machine does hits both alike. It prints, per bench and
# figure, the medians for base and head and head/base, and ends with one verdict line per
# bench: PASS when the gateway's throughput head/base is at least the threshold (for the NATS
# bench, at every --pipeline setting), REGRESSION otherwise.
#
# Each side runs its own bench binary against its own daemon (--gateway-bin). A base bench from
# before stub mode had --gateway-bin gets the daemon started here instead, the same way
# (default settings, CGW_HTTP_ADDR=off, no inherited CGW_* variable).
#
# Bench args go to every run of both benches; --duration 1 and --warmup 0.5 are added unless
# they are given. Options for one bench only (e.g. NATS mode's --pipeline list, or --no-echo)
# go in the variables below. The script sets --mode, --gateway-bin, --socket and --pid itself.
#
#   BENCH_COMPARE_ROUNDS=5          rounds; each runs every bench once on each side (at least 3)
#   BENCH_COMPARE_THRESHOLD=0.97    the verdict's bound on head/base throughput
#   BENCH_COMPARE_MODES="stub nats" which benches, in this order within a round
#   BENCH_COMPARE_STUB_ARGS=""      extra arguments of the stub bench only
#   BENCH_COMPARE_NATS_ARGS=""      extra arguments of the NATS bench only
#
# Builds share the cargo target dir target/bench-compare/cargo (kept, so a second comparison
# rebuilds only the workspace crates); every bench output is kept in target/bench-compare/runs/.
# The NATS bench needs nats-server on PATH (Debian's package, as tests/run-all.sh installs).
# With the defaults a round takes about 25 s, after the two builds (about 5 minutes the first
# time on 2 cores, 1 to 2 minutes after that: the workspace crates of each side).
# Exit status: 0 all PASS, 3 a REGRESSION, 2 bad usage, 1 any other failure.
#
#   tests/bench-compare.sh main
#   BENCH_COMPARE_NATS_ARGS="--pipeline 16" tests/bench-compare.sh HEAD~1 --connections 16
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
}
die() {
    echo "bench-compare: $*" >&2
    exit 1
}

[ $# -ge 1 ] || { echo "bench-compare: BASE_REV is missing" >&2; usage; }
case $1 in -h | --help) usage ;; esac
base_rev=$1
shift
bench_args=("$@")

rounds=${BENCH_COMPARE_ROUNDS:-5}
threshold=${BENCH_COMPARE_THRESHOLD:-0.97}
read -r -a modes <<<"${BENCH_COMPARE_MODES:-stub nats}"
read -r -a stub_args <<<"${BENCH_COMPARE_STUB_ARGS:-}"
read -r -a nats_args <<<"${BENCH_COMPARE_NATS_ARGS:-}"

if ! [[ $rounds =~ ^[0-9]+$ ]] || [ "$rounds" -lt 3 ]; then
    echo "bench-compare: BENCH_COMPARE_ROUNDS must be a whole number >= 3" >&2
    exit 2
fi
[[ $threshold =~ ^[0-9]*\.?[0-9]+$ ]] ||
    { echo "bench-compare: BENCH_COMPARE_THRESHOLD must be a number such as 0.97" >&2; exit 2; }
[ ${#modes[@]} -gt 0 ] || { echo "bench-compare: BENCH_COMPARE_MODES is empty" >&2; exit 2; }
for mode in "${modes[@]}"; do
    case $mode in stub | nats) ;; *)
        echo "bench-compare: BENCH_COMPARE_MODES: unknown bench '$mode' (stub, nats)" >&2
        exit 2
        ;;
    esac
done
for arg in "${bench_args[@]}" "${stub_args[@]}" "${nats_args[@]}"; do
    case $arg in --mode* | --gateway-bin* | --socket* | --pid* | --echo-only | --direct-only)
        echo "bench-compare: $arg: the script chooses the mode and the daemon itself" >&2
        exit 2
        ;;
    esac
done
given() {
    local flag=$1 arg
    for arg in "${bench_args[@]}"; do
        case $arg in "$flag" | "$flag="*) return 0 ;; esac
    done
    return 1
}
given --duration || bench_args+=(--duration 1)
given --warmup || bench_args+=(--warmup 0.5)

root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel) ||
    die "$(dirname "$0") is not in a git work tree"
cd "$root"
base=$(git rev-parse --verify --quiet "$base_rev^{commit}") ||
    { echo "bench-compare: BASE_REV '$base_rev' is not a commit of $root" >&2; exit 2; }
head=$(git rev-parse --verify 'HEAD^{commit}')
short() { git rev-parse --short "$1"; }
command -v cargo >/dev/null || die "cargo is not on PATH"
for mode in "${modes[@]}"; do
    if [ "$mode" = nats ] && ! command -v nats-server >/dev/null; then
        die "the NATS bench needs nats-server on PATH (apt-get install nats-server), or leave \
it out: BENCH_COMPARE_MODES=stub"
    fi
done

work=$root/target/bench-compare
mkdir -p "$work"
exec 9>"$work/lock"
flock -n 9 || die "another bench-compare is running in $work"
export CARGO_TARGET_DIR=$work/cargo
runs_dir=$work/runs
rm -rf "$runs_dir"
mkdir -p "$runs_dir"
figures=$runs_dir/figures.tsv
: >"$figures"

# Everything this script starts or creates, undone on any exit.
daemon_pid=""
daemon_dir=""
worktrees=()
cleanup() {
    if [ -n "$daemon_pid" ]; then
        kill "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    [ -z "$daemon_dir" ] || rm -rf "$daemon_dir"
    local tree
    for tree in "${worktrees[@]}"; do
        git -C "$root" worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"
    done
    git -C "$root" worktree prune
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start=$SECONDS
phase_start=$SECONDS
phase() {
    echo "phase: $1 took $((SECONDS - phase_start)) s"
    phase_start=$SECONDS
}

echo "bench-compare: base $(short "$base") ($base_rev), head $(short "$head") (HEAD)"
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "bench-compare: note: uncommitted changes in $root are not measured (HEAD is)"
fi
echo "  rounds $rounds, benches ${modes[*]}, threshold $threshold on gateway req/s head/base"
echo "  bench args: ${bench_args[*]}"
[ ${#stub_args[@]} -eq 0 ] || echo "  stub bench only: ${stub_args[*]}"
[ ${#nats_args[@]} -eq 0 ] || echo "  NATS bench only: ${nats_args[*]}"
echo "  cargo target dir $CARGO_TARGET_DIR, outputs in $runs_dir"

# build SIDE COMMIT: the release daemon and bench of COMMIT, copied to $work/SIDE/.
build() {
    local side=$1 commit=$2 tree=$work/src-$1 log=$work/build-$1.log
    if [ -e "$tree" ]; then # left over by a run that was killed
        git worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"
        git worktree prune
    fi
    worktrees+=("$tree")
    git worktree add --quiet --detach "$tree" "$commit"
    echo "building $side ($(short "$commit")) in $tree (log: $log)"
    # --locked: the revision's own Cargo.lock, never re-resolved (tests/Cargo.toml says why).
    if ! (cd "$tree" && cargo build --release --locked -p ipc-gateway -p ipc-gateway-tests \
        --bin ipc-gateway --bin ipc-gateway-bench) >"$log" 2>&1 9>&-; then
        tail -n 30 "$log" >&2
        die "the $side build failed (full log: $log)"
    fi
    rm -rf "${work:?}/$side"
    mkdir -p "$work/$side"
    cp "$CARGO_TARGET_DIR/release/ipc-gateway" "$CARGO_TARGET_DIR/release/ipc-gateway-bench" \
        "$work/$side/"
    git worktree remove --force "$tree"
    phase "build $side"
}
build base "$base"
if [ "$head" = "$base" ]; then # an A/A run: the same binaries on both sides
    rm -rf "${work:?}/head"
    cp -r "$work/base" "$work/head"
else
    build head "$head"
fi

# Does this side's bench start the stub-mode daemon itself? (--gateway-bin listed among the
# common options, before the NATS mode heading of --help.)
stub_flag() {
    local help
    help=$("$work/$1/ipc-gateway-bench" --help)
    [[ ${help%%NATS mode*} == *--gateway-bin* ]]
}
declare -A own_daemon
for side in base head; do
    if stub_flag "$side"; then
        own_daemon[$side]=yes
    else
        own_daemon[$side]=no
        echo "  $side: its bench predates stub-mode --gateway-bin: this script starts its daemon"
    fi
done

# The daemon of SIDE in stub mode, started as the bench's --gateway-bin would.
start_stub_daemon() {
    local side=$1 var
    daemon_dir=$(mktemp -d -t bench-compare.XXXXXX)
    local unset=()
    for var in $(compgen -e); do
        case $var in CGW_* | RUST_LOG) unset+=(-u "$var") ;; esac
    done
    env "${unset[@]}" CGW_IPC_SOCKET_PATH="$daemon_dir/gw.sock" CGW_HTTP_ADDR=off \
        "$work/$side/ipc-gateway" </dev/null >/dev/null 2>"$daemon_dir/stderr" 9>&- &
    daemon_pid=$!
    local tries=0
    until [ -S "$daemon_dir/gw.sock" ]; do
        if ! kill -0 "$daemon_pid" 2>/dev/null || [ $((tries += 1)) -gt 200 ]; then
            tail -n 20 "$daemon_dir/stderr" >&2
            die "the $side daemon did not open its socket"
        fi
        sleep 0.05
    done
    sleep 0.2 # the socket file appears at bind(); listen() follows
}
stop_stub_daemon() {
    kill "$daemon_pid"
    wait "$daemon_pid" || true
    daemon_pid=""
    rm -rf "$daemon_dir"
    daemon_dir=""
}

# run_bench MODE SIDE ROUND: one bench run; its RESULT lines go to $figures as
# MODE SIDE ROUND ROW FIGURE VALUE (ROW: the target, after the --pipeline setting in NATS mode).
run_bench() {
    local mode=$1 side=$2 round=$3 out=$runs_dir/$1-$2-$3.txt t0=$SECONDS status=0
    local bench=$work/$side/ipc-gateway-bench daemon=$work/$side/ipc-gateway
    local args=(--mode "$mode" "${bench_args[@]}")
    if [ "$mode" = nats ]; then
        args+=(--gateway-bin "$daemon" "${nats_args[@]}")
    elif [ "${own_daemon[$side]}" = yes ]; then
        args+=(--gateway-bin "$daemon" "${stub_args[@]}")
    else
        start_stub_daemon "$side"
        args+=(--socket "$daemon_dir/gw.sock" --pid "$daemon_pid" "${stub_args[@]}")
    fi
    "$bench" "${args[@]}" >"$out" 2>&1 9>&- || status=$?
    [ "$mode" = nats ] || [ "${own_daemon[$side]}" = yes ] || stop_stub_daemon
    if [ "$status" -ne 0 ]; then
        tail -n 30 "$out" >&2
        die "the $mode bench of $side failed in round $round (exit $status; output: $out)"
    fi
    awk -v mode="$mode" -v side="$side" -v round="$round" '
        /^RESULT / {
            delete f
            for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
            row = ("pipeline" in f) ? "P=" f["pipeline"] " " f["target"] : f["target"]
            n = split("rps p50_us p99_us", names, " ")
            for (i = 1; i <= n; i++)
                if (names[i] in f)
                    printf "%s\t%s\t%s\t%s\t%s\t%s\n", mode, side, round, row, names[i], f[names[i]]
        }' "$out" >>"$figures"
    local gw
    gw=$(awk '/^RESULT / && / target=gateway / {
        for (i = 2; i <= NF; i++) if ($i ~ /^rps=/) printf "%s%s", sep, substr($i, 5)
        sep = ", "
    }' "$out")
    echo "  round $round $mode $side: gateway req/s ${gw:-none} ($((SECONDS - t0)) s)"
}

# Base and head alternate, and which of them goes first alternates too (base head, head base,
# ...): a run that is always second would meet a different machine (the other's teardown, a
# rhythm of other load) in every round.
echo "running: ${modes[*]}, $rounds rounds, base and head alternately (base first in odd rounds)"
for round in $(seq "$rounds"); do
    for mode in "${modes[@]}"; do
        if [ $((round % 2)) -eq 1 ]; then
            run_bench "$mode" base "$round"
            run_bench "$mode" head "$round"
        else
            run_bench "$mode" head "$round"
            run_bench "$mode" base "$round"
        fi
    done
done
phase "bench runs"

# The medians, their ratios and the verdicts. The ratio gateway/<control> of each run (echo-1t
# in stub mode, direct in NATS mode: the same code on both sides when only the daemon changed)
# is added as a figure too: it cancels some of the machine's noise, and the control's own
# head/base shows how large that noise was. The last column pairs the base and head runs of
# each round (run back to back): the spread of these head/base ratios is the noise between two
# runs.
verdicts=$runs_dir/verdicts.txt
awk -F '\t' -v threshold="$threshold" -v rounds="$rounds" -v base="$(short "$base")" \
    -v head="$(short "$head")" -v verdicts="$verdicts" '
    function sorted(list, v,    n, i, j, x) {
        n = split(list, v, " ")
        for (i = 2; i <= n; i++) {
            x = v[i]
            for (j = i - 1; j >= 1 && v[j] + 0 > x + 0; j--) v[j + 1] = v[j]
            v[j + 1] = x
        }
        return n
    }
    function median(list,    v, n) {
        n = sorted(list, v)
        return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
    }
    # "median (min-max)" of the head/base ratios of the rounds that have both sides.
    # Also leaves the lowest and the highest in pr_min and pr_max.
    function per_round(k,    r, list, v, n) {
        list = ""
        for (r = 1; r <= rounds; r++)
            if ((k, "base", r) in val && (k, "head", r) in val && val[k, "base", r] > 0)
                list = list " " val[k, "head", r] / val[k, "base", r]
        n = sorted(list, v)
        pr_min = n ? v[1] : ""; pr_max = n ? v[n] : ""
        return n ? sprintf("%.3f (%.3f-%.3f)", median(list), v[1], v[n]) : ""
    }
    function side_list(k, side,    r, list) {
        list = ""
        for (r = 1; r <= rounds; r++) if ((k, side, r) in val) list = list " " val[k, side, r]
        return list
    }
    # One figure: the medians of base and head, head/base, and the ratios round by round.
    function show(mode, row, fig, label, decimals,    k, b, h, ratio, num, rounds_text) {
        k = mode SUBSEP row SUBSEP fig
        if (side_list(k, "base") == "" || side_list(k, "head") == "") return ""
        b = median(side_list(k, "base")); h = median(side_list(k, "head"))
        ratio = b > 0 ? h / b : 0
        num = "%12." decimals "f"
        rounds_text = per_round(k)
        if (fig != "rps" && fig != "ratio")
            rounds_text = sprintf("%-21s  lower is better", rounds_text)
        printf "%-20s %-6s " num " " num " %9.3f   %s\n", row, label, b, h, ratio, rounds_text
        return ratio
    }
    {
        mode = $1; side = $2; round = $3; row = $4; fig = $5
        k = mode SUBSEP row SUBSEP fig
        if (!(k in seen)) { seen[k] = 1; order[mode, ++count[mode]] = row SUBSEP fig }
        val[k, side, round] = $6
        if (!(mode in modes)) { modes[mode] = 1; mode_order[++nmodes] = mode }
    }
    END {
        # The ratio gateway/<control> of each run, a figure of its own after the gateway rows.
        for (m = 1; m <= nmodes; m++) {
            mode = mode_order[m]
            control = mode == "nats" ? "direct" : "echo-1t"
            for (r = 1; r <= count[mode]; r++) {
                split(order[mode, r], p, SUBSEP); row = p[1]
                if (p[2] != "rps" || row !~ /(^| )gateway$/) continue
                pre = substr(row, 1, length(row) - length("gateway"))  # "P=16 " or ""
                kg = mode SUBSEP row SUBSEP "rps"; kc = mode SUBSEP pre control SUBSEP "rps"
                for (s = 1; s <= 2; s++) {
                    side = s == 1 ? "base" : "head"
                    for (n = 1; n <= rounds; n++)
                        if ((kg, side, n) in val && (kc, side, n) in val && val[kc, side, n] > 0)
                            val[mode SUBSEP pre "gateway/" control SUBSEP "ratio", side, n] = \
                                val[kg, side, n] / val[kc, side, n]
                }
            }
        }
        for (m = 1; m <= nmodes; m++) {
            mode = mode_order[m]
            control = mode == "nats" ? "direct" : "echo-1t"
            printf "\n== %s bench: medians of %d runs each, base %s, head %s ==\n", mode, rounds, \
                base, head
            printf "%-20s %-6s %12s %12s %9s   %s\n", "", "figure", "base", "head", \
                "head/base", "per round: median (min-max)"
            worst = ""; noise = ""; split_rounds = ""
            for (r = 1; r <= count[mode]; r++) {
                split(order[mode, r], p, SUBSEP); row = p[1]; fig = p[2]
                label = fig == "rps" ? "req/s" : (fig == "p50_us" ? "p50 us" : "p99 us")
                ratio = show(mode, row, fig, label, 0)
                if (ratio == "" || fig != "rps") continue
                if (row ~ /(^| )gateway$/) {
                    if (worst == "" || ratio < worst) { worst = ratio; worst_row = row }
                    # Some rounds below the threshold and some as far above 1: they disagree.
                    if (pr_min != "" && pr_min < threshold + 0 && pr_max > 1 / threshold) {
                        split_rounds = split_rounds sprintf("%s%s rounds %.3f-%.3f", \
                            split_rounds == "" ? "" : ", ", row, pr_min, pr_max)
                    }
                    pre = substr(row, 1, length(row) - length("gateway"))
                    show(mode, pre "gateway/" control, "ratio", "req/s", 3)
                } else {
                    d = ratio > 1 ? ratio - 1 : 1 - ratio
                    if (noise == "" || d > noise) { noise = d; noise_row = row }
                }
            }
            if (worst == "") {
                line = sprintf("VERDICT %s: NO FIGURES (no gateway run on both sides)", mode)
            } else {
                word = worst >= threshold ? "PASS" : "REGRESSION"
                cmp = worst >= threshold ? ">=" : "<"
                line = sprintf("VERDICT %s: %s: gateway req/s head/base %.3f %s %s (%s)", mode, \
                    word, worst, cmp, threshold, worst_row)
            }
            # NOISY: the verdict is within the noise of this run. The controls run the same code
            # on both sides when only the daemon changed, so when one moves by more than the
            # threshold allows, so can the gateway; and rounds that disagree (some below the
            # threshold, some as far above 1) say the same of the gateway itself.
            noisy = split_rounds
            if (noise != "" && noise > 1 - threshold)
                noisy = sprintf("control %s moved %.1f%%%s%s", noise_row, noise * 100, \
                    noisy == "" ? "" : ", ", noisy)
            if (noisy != "")
                line = line "; NOISY (" noisy "): more than the threshold allows"
            else if (noise != "")
                line = line sprintf("; controls moved at most %.1f%% (%s)", noise * 100, noise_row)
            print line > verdicts
            verdict_line[m] = line
        }
        print ""
        for (m = 1; m <= nmodes; m++) print verdict_line[m]
    }' "$figures"
phase "analysis"
echo "bench-compare: total $((SECONDS - start)) s"
if grep -q ': REGRESSION' "$verdicts" || grep -q ': NO FIGURES' "$verdicts"; then
    exit 3
fi
