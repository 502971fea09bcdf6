# shellcheck shell=bash
# Sourced by benches/redis-ab.sh and benches/client-busy.sh: starts one server per word of $BINS
# (a timberd binary by path, or `redis`) on ports above $1, each with its data under $WORK, and
# waits until each answers PING. Sets NAMES (a label per server, in $BINS order), PORT and PID
# (by label), and an EXIT trap that stops them and removes $WORK.
# Reads: BINS, WORK, SYNC (timberd's --sync; Redis gets appendfsync always under `always`,
# everysec otherwise), WORKERS (timberd's --workers), EXTRA (more timberd flags).

declare -A PORT PID
NAMES=()
stop_servers() {
    for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap stop_servers EXIT

start_servers() { # first port minus one
    local port=$1 b name mode
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
    for name in "${NAMES[@]}"; do
        for _ in $(seq 100); do redis-cli -p "${PORT[$name]}" PING >/dev/null 2>&1 && break; sleep 0.1; done
    done
}
