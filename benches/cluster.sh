#!/usr/bin/env bash
# timberd as a three-member Raft cluster against one timberd, side by side: SET and GET through
# redis-benchmark (pipelines of 1 and 16) against the cluster's leader and against a single
# node started with the same --sync, alternating which goes first each round. Prints each row's
# median and range, and the cluster's over the single node's.
#
# Usage: benches/cluster.sh   (after: cargo build --release -p timber-server)
#   N      requests per run (default 100000);  R  rounds (default 3);  C  clients (default 50)
#   SYNC   timberd's --sync (default always);  WORKERS timberd's --workers (default 1)
#   BIN    directory of the binaries (default target/release)
# Needs: redis-benchmark and redis-cli (apt-get install redis-tools).
set -euo pipefail

N=${N:-100000}; R=${R:-3}; C=${C:-50}
SYNC=${SYNC:-always}; WORKERS=${WORKERS:-1}; BIN=${BIN:-target/release}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cluster-bench.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

timberd() { # name resp-port -- extra flags
    local name=$1 port=$2; shift 3
    "$BIN/timberd" --data-dir "$WORK/$name" --resp-addr "127.0.0.1:$port" \
        --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 --sync "$SYNC" --workers "$WORKERS" \
        "$@" 2>"$WORK/$name.log" &
    PIDS+=($!)
}
ready() { # port
    for _ in $(seq 100); do redis-cli -p "$1" PING >/dev/null 2>&1 && return; sleep 0.1; done
    echo "timberd on $1 did not start" >&2; cat "$WORK"/*.log >&2; exit 1
}
INITIAL="1=127.0.0.1:17911,2=127.0.0.1:17912,3=127.0.0.1:17913"
for i in 1 2 3; do
    timberd "member$i" "1790$i" -- --node-id "$i" --raft-addr "127.0.0.1:1791$i" --initial-cluster "$INITIAL"
done
timberd single 17900 --
for p in 17900 17901 17902 17903; do ready "$p"; done
LEADER=
for _ in $(seq 100); do
    for p in 17901 17902 17903; do
        redis-cli -p "$p" INFO replication | grep -q role:master && LEADER=$p && break 2
    done
    sleep 0.1
done
[ -n "$LEADER" ] || { echo "no leader" >&2; exit 1; }
declare -A PORT=([single]=17900 [cluster]=$LEADER)

run() { # port pipeline test -> requests per second
    redis-benchmark -p "$1" -n "$N" -c "$C" -P "$2" -r 100000 -t "$3" --csv 2>/dev/null \
        | grep -v '^"test"' | tail -n 1 | awk -F'","' '{gsub(/"/,"",$2); print $2}'
}

declare -A RES
for i in $(seq "$R"); do
    order=(single cluster); (( i % 2 == 0 )) && order=(cluster single)
    for s in "${order[@]}"; do
        for t in set get; do
            RES[$s.$t.1]+="$(run "${PORT[$s]}" 1 $t) "
            RES[$s.$t.16]+="$(run "${PORT[$s]}" 16 $t) "
        done
    done
    echo "round $i done" >&2
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR]=$1} END {m=(NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2; print m, v[1], v[NR]}'; }
printf "%-10s %-28s %-28s %s\n" "workload" "single: median (range)" "cluster: median (range)" "cluster/single"
for t in set get; do
    for p in 1 16; do
        read -r sm slo shi <<<"$(echo "${RES[single.$t.$p]}" | median)"
        read -r cm clo chi <<<"$(echo "${RES[cluster.$t.$p]}" | median)"
        printf "%-10s %-28s %-28s %.2fx\n" "${t^^} P$p" "$sm ($slo-$shi)" "$cm ($clo-$chi)" \
            "$(echo "$cm / $sm" | bc -l)"
    done
done
