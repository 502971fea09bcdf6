#!/usr/bin/env bash
# The project's test command: installs what the tests need, then runs formatting and lint
# checks and every test. Usage: scripts/test.sh [--no-install]
#
# Installs (only what is missing):
#   - redis-tools (Debian package; the server's end-to-end tests run redis-cli), via apt-get,
#     with sudo when not root;
#   - the rustfmt and clippy components of the active toolchain, via rustup.
# Then runs: cargo fmt --check, cargo clippy -D warnings (also with the failpoints features of
# wal, kv and stream), cargo test --workspace, the fault-injection suites (tests/failpoints.rs of
# wal, kv and stream, built with their `failpoints` features), and the server's end-to-end
# suites again against `timberd --workers 1` (a current-thread runtime).
set -euo pipefail
cd "$(dirname "$0")/.."

install=1
[ "${1:-}" = "--no-install" ] && install=0

if [ "$install" = 1 ]; then
    if ! command -v redis-cli >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" = 0 ] || SUDO="sudo"
        $SUDO apt-get update -q
        $SUDO apt-get install -y -q redis-tools
    fi
    cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
    cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

# The failpoints of the storage crates and their fault-injection suites (docs/ARCHITECTURE.md,
# "Fault injection"); without these features the failpoints are compiled out.
FAILPOINTS=timber-wal/failpoints,timber-kv/failpoints,timber-stream/failpoints

echo "== cargo clippy with failpoints"
cargo clippy -p timber-wal -p timber-kv -p timber-stream --all-targets --features "$FAILPOINTS" \
    -- -D warnings

echo "== cargo test --workspace"
cargo test --workspace

echo "== fault injection: the failpoint suites of wal, kv and stream"
cargo test -p timber-wal -p timber-kv -p timber-stream --features "$FAILPOINTS" --test failpoints

echo "== the server's end-to-end suites against timberd --workers 1"
TIMBER_TEST_WORKERS=1 cargo test -p timber-server --test resp --test resp_streams --test grpc_http --test cluster
