#!/usr/bin/env bash
# The device check for a GPU machine that builds nothing: run it there from a folder holding
#   ditrun            the binary built here with
#                     `cargo build --release --no-default-features --features cuda,ndarray`
#                     (no MPI: it starts on a machine without OpenMPI)
#   bench/            a copy of ../shared/bench (torch_baseline.py)
# It prints one JSON line per check, the ditrun and PyTorch runs of a batch size right after
# each other: ditrun f32 with burn's fusion (`cuda`) and without (`cuda-nofusion`), ditrun
# bf16, PyTorch eager f32 and PyTorch --tuned (bf16 autocast + SDPA + fused AdamW), at batch
# 64 and 256; a 1-rank NCCL all-reduce smoke test (72.6 MB averaged in place on the GPU on a
# fused tensor; `mean_is_exact` must be true); then the quickstart job trained on the GPU in
# f32 and in bf16, each printing its final loss (samples and logs land in $OUT when set).
#   usage: bash gpu-check.sh [DIR] [all|bench|quickstart]
#          DIR defaults to the script's folder; each phase alone stays under 6 minutes, so
#          that one phase can be rerun within a device session's budget.
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
phase="${2:-all}"
cd "$dir"
run 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$phase" = all ] || [ "$phase" = bench ]; then
    for batch in 64 256; do
        run 90 ./ditrun bench --backend cuda --batch $batch --steps 20 --warmup 5
        run 90 ./ditrun bench --backend cuda-nofusion --batch $batch --steps 20 --warmup 5
        run 90 ./ditrun bench --backend cuda --precision bf16 --batch $batch --steps 20 --warmup 5
        run 60 python3 bench/torch_baseline.py --device cuda --batch $batch --steps 20
        run 60 python3 bench/torch_baseline.py --device cuda --batch $batch --steps 20 --tuned
    done
    run 45 ./ditrun bench --backend cuda --allreduce --steps 10
fi
if [ "$phase" = all ] || [ "$phase" = quickstart ]; then
    cd "$repo"
    for precision in f32 bf16; do
        start=$(date +%s)
        run_out="$out/quickstart-$precision"
        mkdir -p "$run_out"
        # The outcome's JSON line (final_loss) goes to stdout; the log's tail to a file.
        RUST_LOG=info run 150 "$dir/ditrun" train --job jobs/quickstart.yaml --set train.backend=cuda \
            --set train.precision=$precision --set data.shards="$out/shards" \
            --set checkpoint.url="$run_out/checkpoints" --set logging.dir="$run_out/tensorboard" \
            --set sample.dir="$run_out/samples" 2> >(tail -40 > "$run_out/train.log")
        echo "{\"check\": \"quickstart on cuda, $precision\", \"wall_s\": $(( $(date +%s) - start ))}"
        rm -rf "$run_out/checkpoints"
    done
    rm -rf "$out/shards"
fi
exit $status
