#!/usr/bin/env bash
# The device check for a GPU machine that builds nothing: run it there from a folder holding
#   ditrun            the binary built here with
#                     `cargo build --release --no-default-features --features cuda,ndarray`
#                     (no MPI: it starts on a machine without OpenMPI)
#   bench/            a copy of ../shared/bench (torch_baseline.py)
# It prints one JSON line per check: the card, ditrun's CUDA bench and PyTorch's on the same
# card, right after each other, and a 1-rank NCCL all-reduce smoke test (72.6 MB averaged in
# place on the GPU; `mean_is_exact` must be true).
#   usage: bash gpu-check.sh [DIR]        (DIR defaults to the script's folder)
set -uo pipefail
dir="${1:-$(dirname "$0")}"
cd "$dir"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 RUST_LOG=warn
status=0
run() {
    echo "== $*" >&2
    timeout 240 "$@" || { echo "{\"check\": \"$1\", \"failed\": $?}"; status=1; }
}
run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run ./ditrun bench --backend cuda --batch 64 --steps 20 --warmup 3
run python3 bench/torch_baseline.py --device cuda --batch 64 --steps 20
run python3 bench/torch_baseline.py --device cuda --batch 64 --steps 20 --clip
run ./ditrun bench --backend cuda --allreduce --steps 10
exit $status
