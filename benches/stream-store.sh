#!/usr/bin/env bash
# timberd's stream appends with fragments on local disk and in an S3-compatible store, side by
# side: XADD through redis-benchmark (pipelines of 1 and 16) and gRPC appends through
# `timber bench --workload append`, against two timberd started once each (one with
# --stream-store local, one with --stream-store s3://... on a timber-s3-server over a local
# directory), alternating which goes first each round. Prints each row's median and range.
#
# Usage: benches/stream-store.sh   (after: cargo build --release -p timber-server -p timber-cli -p timber-s3-server)
#   N      XADD requests per run (default 200000);   R  rounds (default 5);  C  clients (default 50)
#   SECS   seconds per gRPC run (default 5);         GC gRPC concurrency (default 16)
#   SYNC   timberd's --sync (default interval:1000); WORKERS timberd's --workers (default 1)
#   BIN    directory of the binaries (default target/release)
# Needs: redis-benchmark and redis-cli (apt-get install redis-tools).
set -euo pipefail

N=${N:-200000}; R=${R:-5}; C=${C:-50}; SECS=${SECS:-5}; GC=${GC:-16}
SYNC=${SYNC:-interval:1000}; WORKERS=${WORKERS:-1}; BIN=${BIN:-target/release}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/stream-store.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret
S3_PORT=17800
"$BIN/timber-s3-server" "$WORK/s3" "127.0.0.1:$S3_PORT" bench >/dev/null &
PIDS+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null && break; sleep 0.1; done

declare -A PORT GPORT
start() { # name port -- extra flags
    local name=$1 port=$2; shift 3
    PORT[$name]=$port; GPORT[$name]=$((port + 100))
    "$BIN/timberd" --data-dir "$WORK/$name" --resp-addr "127.0.0.1:$port" \
        --grpc-addr "127.0.0.1:${GPORT[$name]}" --http-addr 127.0.0.1:0 --sync "$SYNC" \
        --workers "$WORKERS" "$@" 2>"$WORK/$name.log" &
    PIDS+=($!)
    for _ in $(seq 100); do redis-cli -p "$port" PING >/dev/null 2>&1 && return; sleep 0.1; done
    echo "timberd ($name) did not start:" >&2; cat "$WORK/$name.log" >&2; exit 1
}
start local 17801 -- --stream-store local
start s3 17802 -- --stream-store s3://bench/timberd --s3-endpoint "http://127.0.0.1:$S3_PORT"

xadd() { # port pipeline -> requests per second
    redis-benchmark -p "$1" -n "$N" -c "$C" -P "$2" --csv XADD bench-stream '*' field value \
        2>/dev/null | grep -v '^"test"' | tail -n 1 | awk -F'","' '{gsub(/"/,"",$2); print $2}'
}
grpc() { # grpc port -> appends per second
    "$BIN/timber" --addr "http://127.0.0.1:$1" --json bench --workload append \
        --concurrency "$GC" --duration "${SECS}s" --value-size 100 2>/dev/null \
        | sed -n 's/.*"ops_per_sec":\([0-9.]*\).*/\1/p'
}

declare -A RES
for i in $(seq "$R"); do
    order=(local s3); (( i % 2 == 0 )) && order=(s3 local)
    for s in "${order[@]}"; do
        RES[$s.xadd1]+="$(xadd "${PORT[$s]}" 1) "
        RES[$s.xadd16]+="$(xadd "${PORT[$s]}" 16) "
        RES[$s.grpc]+="$(grpc "${GPORT[$s]}") "
    done
    echo "round $i done" >&2
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR]=$1} END {m=(NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2; printf "%.0f (%.0f-%.0f)", m, v[1], v[NR]}'; }
printf "%-22s %-28s %-28s\n" "workload" "local: median (range)" "s3: median (range)"
for w in xadd1:"XADD P1 (req/s)" xadd16:"XADD P16 (req/s)" grpc:"gRPC append c=$GC (/s)"; do
    k=${w%%:*}; label=${w#*:}
    printf "%-22s %-28s %-28s\n" "$label" "$(echo "${RES[local.$k]}" | median)" "$(echo "${RES[s3.$k]}" | median)"
done
for s in local s3; do
    echo "$s: $(redis-cli -p "${PORT[$s]}" XLEN bench-stream) entries in bench-stream"
done
echo "fragments in the bucket: $(find "$WORK/s3/bench" -name '*.frag' | wc -l)"
