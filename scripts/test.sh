#!/usr/bin/env bash
# The whole test suite, as CI runs it, on a fresh machine of this project's
# kind (Debian, Rust toolchain, root). Installs what the tests need itself.
set -euo pipefail
cd "$(dirname "$0")/.."

# A build cache outside the clone makes reruns fast; the suite passes without one.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shoal/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# System packages the tests need: a real headless browser for the web UI
# tests (Debian's chromium), socat for the serial (pty) Modbus tests,
# PostgreSQL for the data that comes up from the edge (each test that
# needs one makes a throwaway cluster of its own with initdb and pg_ctl in
# a temporary directory, on a free port, run as the postgres user, and
# stops it after; the package's own cluster is not used); the namespace
# tests need only iproute2. The anchor's build fetches the web UI's
# Automerge with npm (cloud-anchor/build.rs): Node.js and npm, Debian's if
# the machine has none.
export DEBIAN_FRONTEND=noninteractive
need_apt=(chromium socat postgresql)
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
for pkg in "${need_apt[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing=1
done
if [ "${missing:-0}" = 1 ]; then
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi

# The device simulators and the API fuzzer, from PyPI, pinned, in a
# virtualenv outside the clone.
venv="${SHOAL_VENV:-$HOME/.cache/shoal/venv}"
# schemathesis checks the anchor's API against its OpenAPI document.
if ! "$venv/bin/python" -c 'import pymodbus, serial, asyncua, schemathesis, hypothesis; assert pymodbus.__version__ == "3.16.1"; assert schemathesis.__version__ == "4.32.5"; assert hypothesis.__version__ == "6.170.17"' >/dev/null 2>&1; then
  python3 -m venv "$venv" 2>/dev/null ||
    { apt-get update -qq && apt-get install -y -qq python3-venv && python3 -m venv "$venv"; }
  "$venv/bin/pip" install -q pymodbus==3.16.1 pyserial==3.5 asyncua==2.1.0 schemathesis==4.32.5 hypothesis==6.170.17
fi
export SHOAL_PYTHON="$venv/bin/python"

echo "== format"
cargo fmt --all -- --check
echo "== lints"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
cargo test --workspace --locked --no-fail-fast
