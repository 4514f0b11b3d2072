#!/usr/bin/env bash
# The device check for a GPU machine that builds nothing: run it there from a folder holding
#   ditrun            the binary built here with
#                     `cargo build --release --no-default-features --features cuda,ndarray`
#                     (no MPI: it starts on a machine without OpenMPI)
#   bench/            a copy of ../shared/bench (torch_baseline.py)
# It prints one JSON line per check: the card, ditrun's CUDA bench and PyTorch's on the same
# card, right after each other, and a 1-rank NCCL all-reduce smoke test (72.6 MB averaged in
# place on the GPU; `mean_is_exact` must be true), then the quickstart job trained on the GPU
# with the seed model's size (its samples and log land in $OUT when that is set).
#   usage: bash gpu-check.sh [DIR]        (DIR defaults to the script's folder)
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="$(cd "${1:-$(dirname "$0")}" && pwd)"
out="${OUT:-$dir/out}"
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 RUST_LOG=warn
# cudarc loads NVRTC and NCCL at run time: the CUDA toolkit's, else those of PyTorch's wheels.
libs=$(python3 -c '
import glob, os, site
found = set()
for pattern in ["/usr/local/cuda/lib64/libnvrtc.so*", "/usr/local/cuda/targets/*/lib/libnvrtc.so*"] + [p + "/nvidia/*/lib/lib*.so*" for p in site.getsitepackages()]:
    found.update(os.path.dirname(f) for f in glob.glob(pattern))
print(":".join(sorted(found)))')
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >&2
status=0
run() {
    local limit=$1; shift
    echo "== $*" >&2
    timeout "$limit" "$@" || { echo "{\"check\": \"$1\", \"failed\": $?}"; status=1; }
}
cd "$dir"
run 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run 150 ./ditrun bench --backend cuda --batch 64 --steps 20 --warmup 3
run 75 python3 bench/torch_baseline.py --device cuda --batch 64 --steps 20
run 75 python3 bench/torch_baseline.py --device cuda --batch 64 --steps 20 --clip
run 45 ./ditrun bench --backend cuda --allreduce --steps 10
cd "$repo"
start=$(date +%s)
RUST_LOG=info run 150 "$dir/ditrun" train --job jobs/quickstart.yaml --set train.backend=cuda \
    --set model.dim=256 --set model.depth=6 --set train.steps=300 --set data.shards="$out/shards" \
    --set checkpoint.url="$out/checkpoints" --set logging.dir="$out/tensorboard" --set sample.dir="$out/samples" \
    2> >(tail -40 > "$out/train.log")
echo "{\"check\": \"quickstart on cuda, seed-sized model\", \"wall_s\": $(( $(date +%s) - start ))}"
rm -rf "$out/shards" "$out/checkpoints"
exit $status
