#!/usr/bin/env bash
# Runs ditrun's test suite on a fresh machine: installs what the tests need (system packages,
# a Python venv with TensorBoard's reader and an S3 server), then `cargo test`.
# The parity tests read ../shared/reference (or $DITRUN_REFERENCE_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
install_system_packages
DITRUN_PYTHON="$(bash scripts/python-venv.sh)"
export DITRUN_PYTHON
# The S3 tests run against moto on 127.0.0.1 (tests/s3.rs starts it itself when this is unset).
# A server of this run's own, so that another run finishing cannot stop it under us.
DITRUN_MOTO_DIR="$(mktemp -d -t ditrun-moto.XXXXXX)"
export DITRUN_MOTO_DIR
trap 'bash scripts/moto.sh stop; rm -rf "$DITRUN_MOTO_DIR"' EXIT
DITRUN_S3_ENDPOINT="$(bash scripts/moto.sh start)"
export DITRUN_S3_ENDPOINT
cargo test --locked "$@"
