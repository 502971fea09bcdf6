#!/usr/bin/env bash
# Runs each fuzz target for a bounded time and fails if any of them crashes: a panic, a hang
# (over 10 s on one input) or an allocation over 64 MiB (fuzz/src/lib.rs).
#
#   fuzz/run.sh [seconds per target, default 60] [target...]
#
# Installs cargo-fuzz if it is missing. It runs on the stable toolchain: libFuzzer without a
# sanitizer (`--sanitizer none`), with debug assertions, so overflows panic. libFuzzer is C++,
# built by libfuzzer-sys: it needs a C++ compiler (Debian: g++). Each target starts from its seeds
# (fuzz/seeds/<target>, committed) and grows fuzz/corpus/<target> (not committed); a crashing
# input is saved under fuzz/artifacts/<target>/ and printed in base64.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(wal_frame kv_block stream_fragment resp_request)

CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
if ! command -v c++ >/dev/null 2>&1; then
    echo "fuzz/run.sh: libFuzzer needs a C++ compiler (Debian: apt-get install g++)" >&2
    exit 1
fi

flags=(--sanitizer none --debug-assertions)
echo "== building the fuzz targets"
cargo fuzz build "${flags[@]}"

failed=()
for t in "${targets[@]}"; do
    echo "== fuzzing $t for ${secs}s"
    mkdir -p "fuzz/corpus/$t"
    if ! cargo fuzz run "${flags[@]}" "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz/run.sh: crashes in ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz/run.sh: ${#targets[@]} targets ran ${secs}s each without a crash"
