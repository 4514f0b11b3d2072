#!/usr/bin/env bash
# Entry point of an MPIJob's Worker pod: `ditrun-worker /usr/sbin/sshd -De` runs the daemon
# (sshd, under which the Launcher's mpirun starts orted and the ranks) and passes the kubelet's
# SIGTERM (eviction, preemption, node drain, spot reclaim) on to every ditrun process below it.
# Without this the SIGTERM reaches only sshd, PID 1, and the ranks hear nothing until SIGKILL.
# One rank told is enough: the ranks agree on a step after every step, rank 0 saves it, and
# every rank exits 143 (`train::Preemption`). The pod then ends once its ranks have.
set -u

"$@" &
daemon=$!

# The ditrun processes descending from $1, from /proc alone (the image has no procps).
ditrun_below() {
    local -A children=()
    local stat pid rest ppid
    for stat in /proc/[0-9]*/stat; do
        read -r pid rest <"$stat" 2>/dev/null || continue
        rest=${rest##*) }
        read -r _ ppid _ <<<"$rest"
        children[$ppid]+="$pid "
    done
    local queue=("$1") found=() current
    while ((${#queue[@]})); do
        current=${queue[0]}
        queue=("${queue[@]:1}")
        [[ "$(cat "/proc/$current/comm" 2>/dev/null)" == ditrun ]] && found+=("$current")
        # shellcheck disable=SC2206 # a space-separated list of pids
        queue+=(${children[$current]:-})
    done
    echo "${found[*]:-}"
}

stop() {
    local ranks
    ranks=$(ditrun_below "$daemon")
    echo "ditrun-worker: $1: asking the ranks to stop (${ranks:-none running})" >&2
    # shellcheck disable=SC2086 # one argument per pid
    [ -n "$ranks" ] && kill "-$1" $ranks 2>/dev/null
    while [ -n "$(ditrun_below "$daemon")" ]; do sleep 0.2; done
    kill -TERM "$daemon" 2>/dev/null
    wait "$daemon"
    exit 143
}
trap 'stop TERM' TERM
trap 'stop INT' INT

wait "$daemon"
