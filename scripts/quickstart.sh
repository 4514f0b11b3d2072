#!/usr/bin/env bash
# Builds ditrun and runs the built-in quickstart (= `ditrun train --job jobs/quickstart.yaml`):
# synthetic captioned shapes are generated on first use, a small DiT trains on them, and
# checkpoints, TensorBoard logs and sample grids land in ./runs/quickstart/.
# Extra arguments go to `ditrun train` (e.g. --set train.steps=100, --resume never).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
install_system_packages
cargo build --locked --bin ditrun
"$CARGO_TARGET_DIR/debug/ditrun" train "$@"
