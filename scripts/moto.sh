#!/usr/bin/env bash
# Runs moto's S3-compatible server on 127.0.0.1 for the storage tests.
#
#   scripts/moto.sh start   start it in the background (once; a running one is reused) and
#                           print its endpoint, e.g. http://127.0.0.1:5055
#   scripts/moto.sh url     print the endpoint of the running server (fails if none)
#   scripts/moto.sh stop    stop it (nothing to do if none runs)
#
#   DITRUN_S3_PORT     port to listen on (default 5055, or any free port if 5055 is taken)
#   DITRUN_MOTO_DIR    where moto.pid, moto.port and moto.log live (default /var/cache/ditrun)
#
# The server keeps every bucket in memory only: stopping it forgets them.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE_DIR="${DITRUN_MOTO_DIR:-/var/cache/ditrun}"
PID_FILE="$STATE_DIR/moto.pid"
PORT_FILE="$STATE_DIR/moto.port"
LOG_FILE="$STATE_DIR/moto.log"
DEFAULT_PORT=5055
START_TIMEOUT_S=30

log() { echo "moto: $*" >&2; }

running_pid() {
    local pid
    pid="$(cat "$PID_FILE" 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

endpoint() { echo "http://127.0.0.1:$(cat "$PORT_FILE")"; }

# Whether an HTTP server answers at $1 (any status counts: moto answers `/` with its bucket list).
answers() {
    "$PYTHON" - "$1" <<'EOF' 2>/dev/null
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1] + "/", timeout=1)
except urllib.error.HTTPError:
    pass
except Exception:
    sys.exit(1)
EOF
}

port_is_free() {
    "$PYTHON" - "$1" <<'EOF' 2>/dev/null
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}

any_free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

choose_port() {
    if [ -n "${DITRUN_S3_PORT:-}" ]; then
        echo "$DITRUN_S3_PORT"
    elif port_is_free "$DEFAULT_PORT"; then
        echo "$DEFAULT_PORT"
    else
        any_free_port
    fi
}

start() {
    if running_pid >/dev/null && answers "$(endpoint)"; then
        endpoint
        return
    fi
    local port
    port="$(choose_port)"
    # Another run may take the port between the check and the bind: then try a fresh one.
    for attempt in 1 2 3; do
        if launch "$port"; then
            endpoint
            return
        fi
        [ -z "${DITRUN_S3_PORT:-}" ] || break
        port="$(any_free_port)"
    done
    log "moto_server did not come up; its log ($LOG_FILE):"
    tail -n 20 "$LOG_FILE" >&2 || true
    exit 1
}

# Starts moto_server on $1 and waits until it answers; fails if it exits or stays silent.
launch() {
    local port="$1" pid
    # Closing fd 8 keeps the server from holding the start lock for its whole life.
    "$(dirname "$PYTHON")/moto_server" -H 127.0.0.1 -p "$port" </dev/null >"$LOG_FILE" 2>&1 8>&- &
    pid=$!
    echo "$pid" >"$PID_FILE"
    echo "$port" >"$PORT_FILE"
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until answers "http://127.0.0.1:$port"; do
        if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
            kill "$pid" 2>/dev/null || true
            rm -f "$PID_FILE" "$PORT_FILE"
            return 1
        fi
        sleep 0.2
    done
    log "moto_server (pid $pid) listening on port $port"
}

stop() {
    local pid
    if pid="$(running_pid)"; then
        kill "$pid" 2>/dev/null || true
        # A stopped (SIGSTOP) server ignores TERM until continued.
        kill -CONT "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        log "stopped moto_server (pid $pid)"
    fi
    rm -f "$PID_FILE" "$PORT_FILE"
}

url() {
    if running_pid >/dev/null; then
        endpoint
    else
        log "no moto_server is running (start it with: scripts/moto.sh start)"
        exit 1
    fi
}

main() {
    local command="${1:-}"
    case "$command" in
        start | stop | url) ;;
        *)
            echo "usage: $0 start|stop|url" >&2
            exit 2
            ;;
    esac
    mkdir -p "$STATE_DIR"
    # Test binaries may ask at the same time; one starts the server, the others reuse it.
    exec 8>"$STATE_DIR/moto.lock"
    flock 8
    PYTHON="$(bash scripts/python-venv.sh)"
    "$command"
}

main "$@"
