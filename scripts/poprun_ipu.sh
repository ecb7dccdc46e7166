#!/usr/bin/env bash
# Launch `ipu-sparse ipu-generate` on an IPU-POD with poprun (Graphcore Poplar SDK 3.3/3.4 host).
#
#   scripts/poprun_ipu.sh [--pod 16|64] [--ipus-per-replica K] [--replicas R] [--instances N]
#                         [--hosts h1,h2] [--partition P] [--vipu-server H] [--cache DIR]
#                         [--compile-only] [--dry-run] -- <ipu-generate arguments>
#
# One 16-IPU pipeline on one host needs no poprun (IPU.md): then this runs the command directly.
# Under poprun, ipu_sparse.ipu.options builds popdist.poptorch.Options(ipus_per_replica=K).
# --compile-only compiles for an offline Mk2 target (no IPUs attached) and fills the
# executable cache, so the run on the POD starts without compiling.
set -euo pipefail

POD=16; IPUS_PER_REPLICA=16; REPLICAS=""; INSTANCES=""; HOSTS=""; PARTITION="${IPUOF_VIPU_API_PARTITION_ID:-}"
VIPU_SERVER="${IPUOF_VIPU_API_HOST:-}"; CACHE="${POPTORCH_CACHE_DIR:-$PWD/out/exe_cache}"; COMPILE_ONLY=0; DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --pod) POD="$2"; shift 2;;
    --ipus-per-replica) IPUS_PER_REPLICA="$2"; shift 2;;
    --replicas) REPLICAS="$2"; shift 2;;
    --instances) INSTANCES="$2"; shift 2;;
    --hosts) HOSTS="$2"; shift 2;;
    --partition) PARTITION="$2"; shift 2;;
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
# One instance per host by default (a POD64 has 4 hosts, each driving 16 IPUs).
INSTANCES="${INSTANCES:-$(( POD == 64 && REPLICAS >= 4 ? 4 : 1 ))}"

APP=(python -m ipu_sparse ipu-generate --ipus "$IPUS_PER_REPLICA" --executable-cache "$CACHE" "$@")
if (( COMPILE_ONLY )); then
  APP+=(--compile-only)
fi
if (( COMPILE_ONLY )) || (( REPLICAS == 1 && INSTANCES == 1 )); then
  CMD=("${APP[@]}")   # compile-only needs no devices; one pipeline on one host needs no poprun
else
  CMD=(poprun --num-instances "$INSTANCES" --num-replicas "$REPLICAS" --ipus-per-replica "$IPUS_PER_REPLICA"
       --executable-cache-path "$CACHE")
  [[ -n "$HOSTS" ]] && CMD+=(--host "$HOSTS")
  [[ -n "$PARTITION" ]] && CMD+=(--vipu-partition "$PARTITION")
  [[ -n "$VIPU_SERVER" ]] && CMD+=(--vipu-server-host "$VIPU_SERVER")
  if [[ -n "$HOSTS" ]]; then
    IFACE="${IPU_SPARSE_MPI_IFACE:-eno1}"
    CMD+=(--mpi-global-args "--tag-output --allow-run-as-root --mca oob_tcp_if_include $IFACE --mca btl_tcp_if_include $IFACE")
  fi
  CMD+=("${APP[@]}")
fi

printf '%q ' "${CMD[@]}"; echo
if (( DRY )); then exit 0; fi
mkdir -p "$CACHE"
exec "${CMD[@]}"
