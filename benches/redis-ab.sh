#!/usr/bin/env bash
# A/B runs of timberd builds (and redis-server) under one redis-benchmark workload, for judging a
# change on a noisy machine: every server is started once, then each round runs the workload
# against each server in turn (the order reverses every other round), and each server's median
# is printed with its CPU per request (user and system, from /proc), its user CPU per request,
# and redis-benchmark's own CPU per request (user and system, from /usr/bin/time).
#
# Usage: BINS="target/release/timberd /tmp/timberd-before redis" T=incr P=16 benches/redis-ab.sh
#   BINS   timberd binaries to compare, by path, and/or `redis` (default: target/release/timberd redis)
#   T      set, get, incr or xadd (default set);  P  pipeline (default 1)
#   N      requests per run (default 100000);    R  rounds (default 5);  C  clients (default 50)
#   SYNC   timberd's --sync (default interval:1000; Redis gets appendfsync always under `always`,
#          everysec otherwise)
#   WORKERS timberd's --workers (default 1, as benches/redis-compare.sh); EXTRA more timberd flags
# Needs: redis-server, redis-benchmark, redis-cli (apt-get install redis-server), GNU time.
set -euo pipefail

BINS=${BINS:-target/release/timberd redis}
T=${T:-set}; P=${P:-1}; N=${N:-100000}; R=${R:-5}; C=${C:-50}
SYNC=${SYNC:-interval:1000}; WORKERS=${WORKERS:-1}; EXTRA=${EXTRA:-}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/redis-ab.XXXXXX")
declare -A RES CPU USR CLI
# shellcheck source=benches/lib/servers.sh
source "$(dirname "$0")/lib/servers.sh"
start_servers 17000

run() { # port -> requests per second
    local what=(-t "$T")
    [[ $T == xadd ]] && what=(XADD bench-stream '*' field value)
    /usr/bin/time -o "$WORK/ctime" -f "%U %S" redis-benchmark -p "$1" -n "$N" -c "$C" -P "$P" \
        -r 100000 --csv "${what[@]}" 2>/dev/null \
        | grep -v '^"test"' | tail -n 1 | awk -F'","' '{gsub(/"/,"",$2); print $2}'
}
ticks() { awk -v f="$2" '{print $f}' "/proc/$1/stat"; } # pid field -> clock ticks
per_req() { awk -v t="$1" -v n="$N" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", t * 1e6 / hz / n}'; }

for i in $(seq "$R"); do
    order=("${NAMES[@]}")
    if (( i % 2 == 0 )); then
        order=(); for (( j=${#NAMES[@]}-1; j>=0; j-- )); do order+=("${NAMES[$j]}"); done
    fi
    for n in "${order[@]}"; do
        p=${PID[$n]}
        u0=$(ticks "$p" 14); s0=$(ticks "$p" 15)
        RES[$n]+="$(run "${PORT[$n]}") "
        u1=$(ticks "$p" 14); s1=$(ticks "$p" 15)
        CPU[$n]+="$(per_req $((u1 - u0 + s1 - s0))) "
        USR[$n]+="$(per_req $((u1 - u0))) "
        CLI[$n]+="$(awk -v n="$N" '{printf "%.2f", ($1 + $2) * 1e6 / n}' "$WORK/ctime") "
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf "%-24s %12s %12s %12s %12s  %s\n" server "median req/s" "cpu us/req" "user us/req" \
    "client us/req" runs
for n in "${NAMES[@]}"; do
    printf "%-24s %12s %12s %12s %12s  %s\n" "$n" "$(median <<<"${RES[$n]}")" \
        "$(median <<<"${CPU[$n]}")" "$(median <<<"${USR[$n]}")" "$(median <<<"${CLI[$n]}")" \
        "${RES[$n]}"
done
