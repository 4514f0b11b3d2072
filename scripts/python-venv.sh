#!/usr/bin/env bash
# Creates (once) the Python virtual environment that tests and CI use for real reference
# tools (TensorBoard's reader, an S3 server, Kubernetes' API schemas), and prints its python's
# path on stdout.
#
#   DITRUN_VENV   where the venv lives (default /var/cache/ditrun/venv, beside the build cache)
#   DITRUN_BASE_PYTHON   the interpreter that creates it (default python3)
#
# To add a tool, append it to PYTHON_PACKAGES (pinned): the next run installs what changed.
set -euo pipefail

VENV="${DITRUN_VENV:-/var/cache/ditrun/venv}"
BASE_PYTHON="${DITRUN_BASE_PYTHON:-python3}"
PYTHON_PACKAGES=(
    # EventAccumulator reads event files without TensorFlow.
    "tensorboard==2.20.0"
    # The S3-compatible server the storage tests run against (the `server` extra brings flask
    # and flask-cors).
    "moto[s3,server]==5.2.5"
    # Offline checks of the Kubernetes manifests (scripts/validate-k8s.py): the API server's
    # JSON Schemas for each Kubernetes version, strict variants included; brings jsonschema.
    "kubernetes-validate==1.37.0"
)

log() { echo "python-venv: $*" >&2; }

ensure_base_python() {
    if "$BASE_PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
        return
    fi
    # Debian ships venv/ensurepip separately from the interpreter.
    log "installing python3 and python3-venv"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3 python3-venv >/dev/null
}

main() {
    mkdir -p "$(dirname "$VENV")"
    # Tests of several binaries may call this at once; one creates, the others wait.
    exec 9>"$VENV.lock"
    flock 9

    local stamp="$VENV/.ditrun-packages"
    local wanted
    wanted="$(printf '%s\n' "${PYTHON_PACKAGES[@]}")"
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
        echo "$VENV/bin/python"
        return
    fi

    ensure_base_python
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV"
        "$BASE_PYTHON" -m venv "$VENV" >&2
    fi
    log "installing ${PYTHON_PACKAGES[*]}"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "${PYTHON_PACKAGES[@]}" >&2
    printf '%s' "$wanted" >"$stamp"
    echo "$VENV/bin/python"
}

main "$@"
