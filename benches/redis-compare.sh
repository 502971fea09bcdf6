#!/usr/bin/env bash
# timberd beside a real redis-server (Debian package redis-server, appendonly yes), driven by the
# same redis-benchmark runs: SET, GET, INCR, XADD; pipelines of 1 and 16; 50 clients. First at
# 1-second durability (appendfsync everysec vs --sync interval:1000), then per-write durability
# (appendfsync always vs --sync always). Runs alternate between the two servers (which one goes
# first alternates too); each row gives the median of REPEAT runs of each, their ratio (timber /
# redis), and the median and range of the REPEAT ratios of runs made back to back, which drift in
# the machine's speed moves less than it moves the medians.
#
# timberd runs with one runtime worker (WORKERS=1: a current-thread runtime), as Redis runs its
# commands on one thread: on a machine of 2 cores each server then leaves a core to
# redis-benchmark. WORKERS=0 keeps
# timberd's default (one worker per core).
#
# Usage: benches/redis-compare.sh            (N=100000 REPEAT=3 WORKERS=1 by default)
# Needs: redis-server and redis-benchmark (apt-get install redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-100000}
REPEAT=${REPEAT:-3}
CLIENTS=50
TESTS=${TESTS:-set,get,incr,xadd}
WORKERS=${WORKERS:-1}
WORKER_FLAG=()
[[ "$WORKERS" != 0 ]] && WORKER_FLAG=(--workers "$WORKERS")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/redis-compare.XXXXXX")
RPORT=${RPORT:-16379}
TPORT=${TPORT:-16380}
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

cargo build -q --release --bin timberd
TIMBERD=${CARGO_TARGET_DIR:-target}/release/timberd

wait_port() { for _ in $(seq 1 100); do redis-cli -p "$1" PING >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "port $1 did not answer" >&2; exit 1; }

# One redis-benchmark run; prints requests per second, or "n/a" if the server refused the command.
run() { # port test pipeline
    local out
    local what=(-t "$2")
    # redis-benchmark has no built-in XADD test: give it the command.
    [[ "$2" == xadd ]] && what=(XADD bench-stream '*' field value)
    out=$(redis-benchmark -p "$1" -n "$N" -c "$CLIENTS" -P "$3" -r 100000 --csv "${what[@]}" 2>/dev/null \
        | grep -v '^"test"' | tail -n 1 || true)
    local rps
    rps=$(echo "$out" | awk -F'","' '{gsub(/"/,"",$2); print $2}')
    if [[ "$rps" =~ ^[0-9]+(\.[0-9]+)?$ && "$rps" != "0.00" ]]; then echo "$rps"; else echo "n/a"; fi
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "n/a"; else print a[int((NR+1)/2)]}'; }

# The median and the range of the ratios of paired runs: "1.04x (0.97-1.10)".
pair_ratios() { # redis runs, then timber runs, as two space-separated lists
    paste -d ' ' <(tr ' ' '\n' <<<"$1") <(tr ' ' '\n' <<<"$2") \
        | awk '$1 != "n/a" && $2 != "n/a" && $1 > 0 { print $2 / $1 }' | sort -g \
        | awk '{ q[NR] = $1 }
            END { if (NR == 0) print "-"; else printf "%.2fx (%.2f-%.2f)", q[int((NR + 1) / 2)], q[1], q[NR] }'
}

printf "%-10s %-6s %-4s %14s %14s %8s  %s\n" durability test P redis_rps timber_rps ratio \
    "paired ratio (range)"
for mode in everysec always; do
    rm -rf "$WORK/redis" "$WORK/timber"; mkdir -p "$WORK/redis" "$WORK/timber"
    redis-server --port "$RPORT" --dir "$WORK/redis" --appendonly yes --appendfsync "$mode" \
        --save "" --daemonize no >/dev/null 2>&1 &
    PIDS+=($!)
    tsync=$([[ $mode == always ]] && echo always || echo interval:1000)
    "$TIMBERD" --data-dir "$WORK/timber" --resp-addr "127.0.0.1:$TPORT" --grpc-addr 127.0.0.1:0 \
        --http-addr 127.0.0.1:0 --sync "$tsync" "${WORKER_FLAG[@]}" 2>/dev/null &
    PIDS+=($!)
    wait_port "$RPORT"; wait_port "$TPORT"
    for test in ${TESTS//,/ }; do
        for p in 1 16; do
            r=(); t=()
            for i in $(seq 1 "$REPEAT"); do
                if (( i % 2 )); then
                    r+=("$(run "$RPORT" "$test" "$p")")
                    t+=("$(run "$TPORT" "$test" "$p")")
                else
                    t+=("$(run "$TPORT" "$test" "$p")")
                    r+=("$(run "$RPORT" "$test" "$p")")
                fi
            done
            rm=$(printf "%s\n" "${r[@]}" | { grep -v n/a || true; } | median)
            tm=$(printf "%s\n" "${t[@]}" | { grep -v n/a || true; } | median)
            ratio=$(awk -v a="$tm" -v b="$rm" 'BEGIN { if (a=="n/a" || b=="n/a" || b==0) print "-"; else printf "%.2fx", a/b }')
            printf "%-10s %-6s %-4s %14s %14s %8s  %s\n" "$mode" "$test" "$p" "$rm" "$tm" "$ratio" \
                "$(pair_ratios "${r[*]}" "${t[*]}")"
        done
    done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    PIDS=()
done
