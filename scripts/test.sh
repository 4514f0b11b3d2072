#!/usr/bin/env bash
# Runs ditrun's test suite on a fresh machine: installs what the tests need (system packages,
# a Python venv with TensorBoard's reader), then `cargo test`.
# The parity tests read ../shared/reference (or $DITRUN_REFERENCE_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
install_system_packages
DITRUN_PYTHON="$(bash scripts/python-venv.sh)"
export DITRUN_PYTHON
cargo test --locked "$@"
