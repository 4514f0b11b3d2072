#!/usr/bin/env bash
# What a refactor must not change: the final parameters' sha256 and loss of the quickstart job
# (1 rank, its own recipe) and of the 2-rank test job (tests/dist.rs's `tiny-dist`, under
# mpirun). Run before and after a change that should move no number; the lines must match.
#   usage: bash scripts/fingerprint.sh [BINARY]   (default: the dev build in the target dir)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
binary="${1:-$CARGO_TARGET_DIR/debug/ditrun}"
work="$(mktemp -d -t ditrun-fingerprint.XXXXXX)"
trap 'rm -rf "$work"' EXIT
pick='import json,sys
for line in sys.stdin:
    if line.startswith("{"):
        o = json.loads(line)
        print(sys.argv[1], "rank", o["rank"], "params_sha256", o["params_sha256"], "final_loss", o["final_loss"])'

RUST_LOG=warn "$binary" train --set data.shards="$work/quickstart/shards" \
    --set checkpoint.url="$work/quickstart/checkpoints" --set logging.dir="$work/quickstart/tensorboard" \
    --set sample.dir="$work/quickstart/samples" | python3 -c "$pick" quickstart

cat > "$work/tiny-dist.yaml" <<EOF
name: tiny-dist
model: { image_size: 8, patch_size: 4, channels: 3, dim: 16, depth: 1, heads: 2, mlp_ratio: 2.0, context_dim: 32 }
text_encoder: { hidden_size: 32, intermediate_size: 64, layers: 2, heads: 2 }
data:
  shards: $work/dist/shards
  prepare: { dataset: synthetic, samples: 64, samples_per_shard: 16 }
  shuffle_window: 2
  prefetch: 2
train: { steps: 6, batch_size: 8, lr: 1.0e-3, warmup_steps: 2, grad_clip: 1.0, ema_decay: 0.9, seed: 7, text_drop_prob: 0.2, backend: auto, threads: 1 }
checkpoint: { url: $work/dist/checkpoints, every_steps: 3, keep_last: 3 }
logging: { dir: $work/dist/tensorboard, every_steps: 50 }
dist: { timeout_secs: 60 }
EOF
RUST_LOG=warn mpirun -np 2 --oversubscribe --bind-to none "$binary" train --job "$work/tiny-dist.yaml" \
    | python3 -c "$pick" two-ranks
