#!/usr/bin/env bash
# Launch `ipu-sparse ipu-generate` on an IPU-POD with poprun (Graphcore Poplar SDK 3.3/3.4 host).
#
#   scripts/poprun_ipu.sh [--pod 16|64] [--ipus-per-replica K] [--replicas R] [--instances N]
#                         [--hosts h1,h2] [--partition P | --allocation A] [--vipu-server H] [--cache DIR]
#                         [--compile-only] [--dry-run] -- <ipu-generate arguments>
#
# The compile-only step and the run use the SAME launcher command and popdist options (only
# `--compile-only` is appended to the application), so the executable cache the first fills is
# the one the second reads. One 16-IPU pipeline on one host needs no poprun (IPU.md): then both
# steps run the command directly. Under poprun the application calls popdist.init() and builds
# popdist.poptorch.Options(ipus_per_replica=K) (ipu_sparse/ipu/options.py).
set -euo pipefail

POD=16; IPUS_PER_REPLICA=16; REPLICAS=""; INSTANCES=""; HOSTS=""; PARTITION="${IPUOF_VIPU_API_PARTITION_ID:-}"
ALLOCATION=""; VIPU_SERVER="${IPUOF_VIPU_API_HOST:-}"; CACHE="${POPTORCH_CACHE_DIR:-$PWD/out/exe_cache}"
COMPILE_ONLY=0; DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --pod) POD="$2"; shift 2;;
    --ipus-per-replica) IPUS_PER_REPLICA="$2"; shift 2;;
    --replicas) REPLICAS="$2"; shift 2;;
    --instances) INSTANCES="$2"; shift 2;;
    --hosts) HOSTS="$2"; shift 2;;
    --partition) PARTITION="$2"; shift 2;;
    --allocation) ALLOCATION="$2"; shift 2;;
    --vipu-server) VIPU_SERVER="$2"; shift 2;;
    --cache) CACHE="$2"; shift 2;;
    --compile-only) COMPILE_ONLY=1; shift;;
    --dry-run) DRY=1; shift;;
    --) shift; break;;
    *) echo "poprun_ipu.sh: unknown option $1 (see the header of this script)" >&2; exit 2;;
  esac
done
case "$POD" in 16|64) ;; *) echo "poprun_ipu.sh: --pod must be 16 or 64, got $POD" >&2; exit 2;; esac
if (( IPUS_PER_REPLICA < 1 || IPUS_PER_REPLICA > POD )); then
  echo "poprun_ipu.sh: --ipus-per-replica $IPUS_PER_REPLICA must be 1..$POD" >&2; exit 2
fi
REPLICAS="${REPLICAS:-$(( POD / IPUS_PER_REPLICA ))}"
if (( REPLICAS * IPUS_PER_REPLICA > POD )); then
  echo "poprun_ipu.sh: $REPLICAS replicas x $IPUS_PER_REPLICA IPUs exceed the POD$POD" >&2; exit 2
fi
if [[ -n "$PARTITION" && -n "$ALLOCATION" ]]; then
  echo "poprun_ipu.sh: give --partition or --allocation, not both" >&2; exit 2
fi
# One instance per host by default (a POD64 has 4 hosts, each driving 16 IPUs).
INSTANCES="${INSTANCES:-$(( POD == 64 && REPLICAS >= 4 ? 4 : 1 ))}"
if (( REPLICAS % INSTANCES )); then
  echo "poprun_ipu.sh: $REPLICAS replicas do not split over $INSTANCES instances" >&2; exit 2
fi

APP=(python -m ipu_sparse ipu-generate --ipus "$IPUS_PER_REPLICA" --executable-cache "$CACHE" "$@")
if (( COMPILE_ONLY )); then
  APP+=(--compile-only)
fi
if (( REPLICAS == 1 && INSTANCES == 1 )) && [[ -z "$HOSTS" ]]; then
  CMD=("${APP[@]}")   # one pipeline on one host: no poprun, for the compile-only step and the run alike
else
  CMD=(poprun --num-instances "$INSTANCES" --num-replicas "$REPLICAS" --ipus-per-replica "$IPUS_PER_REPLICA"
       --executable-cache-path "$CACHE")
  [[ -n "$PARTITION" ]] && CMD+=(--vipu-partition "$PARTITION" --update-partition=yes)
  [[ -n "$ALLOCATION" ]] && CMD+=(--vipu-allocation "$ALLOCATION")
  [[ -n "$VIPU_SERVER" ]] && CMD+=(--vipu-server-host "$VIPU_SERVER")
  if [[ -n "$HOSTS" ]]; then
    IFACE="${IPU_SPARSE_MPI_IFACE:-eno1}"
    CMD+=(--host "$HOSTS"
          --mpi-global-args="--tag-output --allow-run-as-root --mca oob_tcp_if_include $IFACE --mca btl_tcp_if_include $IFACE"
          --mpi-local-args="-x PATH -x LD_LIBRARY_PATH -x PYTHONPATH -x CPATH -x POPLAR_SDK_ENABLED -x IPU_SPARSE_POPART_OPS_LIB")
  fi
  CMD+=("${APP[@]}")
fi

printf '%q ' "${CMD[@]}"; echo
if (( DRY )); then exit 0; fi
mkdir -p "$CACHE"
exec "${CMD[@]}"
