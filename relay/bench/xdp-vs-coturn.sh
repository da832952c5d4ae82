#!/usr/bin/env bash
# coturn, our relay in user space and our relay with its XDP fast path, in
# network namespaces, back to back (relay/examples/xdp_vs_coturn.rs says
# what is measured). Needs root, coturn, clang (the XDP program), ethtool.
#
#   bash relay/bench/xdp-vs-coturn.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/../.."
for t in turnserver turnutils_uclient turnutils_peer ethtool clang; do
    command -v "$t" >/dev/null || [ -x "/usr/sbin/$t" ] || { echo "missing $t: bash scripts/setup" >&2; exit 2; }
done
target="${CARGO_TARGET_DIR:-target}"
cargo build --release -p relay --bin relay --example xdp_vs_coturn
exec "$target/release/examples/xdp_vs_coturn" "$@"
