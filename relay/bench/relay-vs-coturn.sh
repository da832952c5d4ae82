#!/usr/bin/env bash
# Benchmark our relay against coturn's turnserver on this machine, in one run.
# Builds the relay and the benchmark programs in release mode, then runs
# relay/examples/relay_vs_coturn.rs (see its header for what is measured).
#
#   bash relay/bench/relay-vs-coturn.sh [--quick] [--no-memory] [--coturn-flood N]
#
# Needs Debian's coturn (turnserver, turnutils_uclient, turnutils_peer).
# Takes about 4-5 minutes; everything runs on 127.0.0.1. Other load on the
# machine skews the numbers: run it on an otherwise idle box, and repeat.
set -euo pipefail
cd "$(dirname "$0")/../.."
for t in turnserver turnutils_uclient turnutils_peer; do
    command -v "$t" >/dev/null || { echo "missing $t: apt-get install coturn" >&2; exit 2; }
done
target="${CARGO_TARGET_DIR:-target}"
cargo build --release -p relay --bin relay --example relay_vs_coturn --example alloc_flood
# 10,000 allocations need 10,000 relayed sockets on each server.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec "$target/release/examples/relay_vs_coturn" "$@"
