#!/usr/bin/env bash
# Four replicas of the 16-IPU pipeline on an IPU-POD64 (4 hosts, one poprun instance per host).
# Set HOSTS=h1,h2,h3,h4 and PARTITION=<vipu partition> (or pass --hosts/--partition).
exec "$(dirname "$0")/poprun_ipu.sh" --pod 64 --ipus-per-replica 16 --replicas 4 --instances 4 \
  ${HOSTS:+--hosts "$HOSTS"} ${PARTITION:+--partition "$PARTITION"} "$@" -- \
  --model "${MODEL:-luminous-base-13b}" --sparsity 0.8 --sparse-head --kv-len 512 ${EXTRA_ARGS:-}
