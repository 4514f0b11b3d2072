#!/usr/bin/env bash
# Builds ditrun (dependencies optimised, see Cargo.toml) and runs `ditrun bench` on the seed
# model. Extra arguments go to `ditrun bench`, e.g. --threads 2 --backend ndarray.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
install_system_packages
cargo build --locked --bin ditrun
"$CARGO_TARGET_DIR/debug/ditrun" bench "$@"
