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
# shellcheck source=benches/lib/servers.sh
source "$(dirname "$0")/lib/servers.sh"
start_servers 17200

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
