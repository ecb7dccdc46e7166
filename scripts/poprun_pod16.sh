#!/usr/bin/env bash
# Luminous-Base-shaped model, 80 % sparse, one 16-IPU pipeline on an IPU-POD16 (no replication).
exec "$(dirname "$0")/poprun_ipu.sh" --pod 16 --ipus-per-replica 16 "$@" -- \
  --model "${MODEL:-luminous-base-13b}" --sparsity 0.8 --sparse-head --kv-len 512 ${EXTRA_ARGS:-}
