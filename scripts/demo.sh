#!/usr/bin/env bash
# The main job on the built-in default model (SmolLM2-135M-Instruct), end to end:
# dense chat -> SparseGPT pruning into the compact sparse format -> sparse chat on the
# compiled CPU kernel -> perplexity side by side -> the IPU memory plan (Luminous Base on
# an IPU-POD16, dense vs 80% sparse) -> the pruned model through a 4-IPU pipeline simulated on CPU.
# Usage: scripts/demo.sh [OUT_DIR]   (run by `make demo` inside .venv)
set -euo pipefail
OUT=${1:-runs/demo}
CLI=${IPU_SPARSE_CLI:-ipu-sparse}
Q="What is the capital of France?"
CKPT="$OUT/smollm2-sparsegpt50-bitmap"
mkdir -p "$OUT"

step() { printf '\n\033[1m== %s ==\033[0m\n' "$*"; }

step "1. dense SmolLM2-135M-Instruct answers"
$CLI generate --model smollm2-135m --chat --stats --max-new-tokens 48 --prompt "$Q"

step "2. prune 50% of every decoder Linear with SparseGPT (32 calibration windows), store as bitmap/bf16"
$CLI prune --model smollm2-135m --method sparsegpt --sparsity 0.5 --nsamples 32 \
    --format bitmap --sparse-dtype bf16 --out "$CKPT" --overwrite
$CLI inspect "$CKPT"

step "3. the sparse model answers (compiled sparse kernel)"
$CLI generate --model "$CKPT" --chat --stats --max-new-tokens 48 --prompt "$Q"
echo "(one-shot pruning without recovery costs a 135M model facts like this one; ipu-sparse recover retrains it: docs/recovery.md)"

step "4. WikiText-2 perplexity, dense vs sparse (L=512, first 4 windows: a quick check)"
$CLI eval --model smollm2-135m --wikitext2 --max-windows 4
$CLI eval --model "$CKPT" --wikitext2 --max-windows 4
echo "does it still chat? short factual questions the dense model answers right (greedy, chat template):"
$CLI eval --model "$CKPT" --chat-probe --reference smollm2-135m

step "5. Luminous Base (13B, assumed shape) on an IPU-POD16: 80% sparse fits, dense does not"
$CLI plan --model luminous-base-13b --ipus 16 --sparsity 0.8 --sparse-head --kv-len 512
$CLI plan --model luminous-base-13b --ipus 16 --sparsity 0 --format dense --kv-len 512 \
    || echo "(as expected: the dense model does not fit the POD16's on-chip memory)"

step "6. SmolLM2 at 80% through a 4-IPU pipeline simulated on CPU (equals the unsplit model)"
$CLI simulate --model smollm2-135m --ipus 4 --sparsity 0.8
