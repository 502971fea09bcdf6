#!/usr/bin/env bash
# Who bounds a redis-benchmark run: the client or the server. For each run, against each server
# in turn, `perf stat` measures redis-benchmark's CPU per request and the server's, and prints
# the client's busy fraction (requests per second times its CPU per request). A client busy
# close to 100% against every server is the bottleneck: the request rate is then its busy
# fraction over its CPU per request, and a server can only move the busy fraction.
#
# Usage: BINS="target/release/timberd redis" T=xadd P=1 benches/client-busy.sh
#   BINS, T, P, N, R, C, SYNC, WORKERS, EXTRA as in benches/redis-ab.sh (N default 150000,
#   R default 4)
# Needs: what redis-ab.sh needs, and perf (Debian's linux-perf) allowed to read other processes.
set -euo pipefail

BINS=${BINS:-target/release/timberd redis}
T=${T:-set}; P=${P:-1}; N=${N:-150000}; R=${R:-4}; C=${C:-50}
SYNC=${SYNC:-interval:1000}; WORKERS=${WORKERS:-1}; EXTRA=${EXTRA:-}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/client-busy.XXXXXX")
declare -A PORT PID
NAMES=()
cleanup() { for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

port=17200
for b in $BINS; do
    name=$([[ $b == redis ]] && echo redis || echo "$(basename "$b")#${#NAMES[@]}")
    NAMES+=("$name")
    port=$((port + 1)); PORT[$name]=$port; mkdir -p "$WORK/$port"
    if [[ $b == redis ]]; then
        mode=$([[ $SYNC == always ]] && echo always || echo everysec)
        redis-server --port "$port" --dir "$WORK/$port" --appendonly yes --appendfsync "$mode" \
            --save "" --daemonize no >/dev/null 2>&1 &
    else
        # shellcheck disable=SC2086
        "$b" --data-dir "$WORK/$port" --resp-addr "127.0.0.1:$port" --grpc-addr 127.0.0.1:0 \
            --http-addr 127.0.0.1:0 --sync "$SYNC" --workers "$WORKERS" $EXTRA 2>/dev/null &
    fi
    PID[$name]=$!
done
for n in "${NAMES[@]}"; do
    for _ in $(seq 100); do redis-cli -p "${PORT[$n]}" PING >/dev/null 2>&1 && break; sleep 0.1; done
done

what=(-t "$T")
[[ $T == xadd ]] && what=(XADD bench-stream '*' field value)
printf "%-24s %10s %14s %14s %12s %14s\n" server "req/s" "client us/req" "server us/req" \
    "client busy" "client cs/req"
for _ in $(seq "$R"); do
    for n in "${NAMES[@]}"; do
        perf stat -x, -e task-clock -p "${PID[$n]}" -o "$WORK/server.txt" 2>/dev/null &
        stat_pid=$!
        sleep 0.2
        perf stat -x, -e task-clock,context-switches -o "$WORK/client.txt" -- \
            redis-benchmark -p "${PORT[$n]}" -n "$N" -c "$C" -P "$P" -r 100000 --csv "${what[@]}" \
            >"$WORK/out.txt" 2>/dev/null
        kill -INT "$stat_pid"; wait "$stat_pid" || true
        rps=$(grep -v '^"test"' "$WORK/out.txt" | tail -n 1 | awk -F'","' '{gsub(/"/,"",$2); print $2}')
        client=$(awk -F, -v n="$N" '$3 == "task-clock" {printf "%.2f", $1 * 1000 / n}' "$WORK/client.txt")
        cs=$(awk -F, -v n="$N" '$3 == "context-switches" {printf "%.3f", $1 / n}' "$WORK/client.txt")
        server=$(awk -F, -v n="$N" '$3 == "task-clock" {printf "%.2f", $1 * 1000 / n}' "$WORK/server.txt")
        busy=$(awk -v r="$rps" -v c="$client" 'BEGIN {printf "%.1f%%", r * c / 1e4}')
        printf "%-24s %10s %14s %14s %12s %14s\n" "$n" "$rps" "$client" "$server" "$busy" "$cs"
    done
done
