#!/bin/bash
# Batch production run of clc-dask on SLURM: one allocation holds a Dask scheduler (on the
# batch node), one GPU worker per node (srun) and the run itself, connected through
# DASK_SCHEDULER_ADDRESS (the run config's cluster.kind must be "address").
#
#   sbatch deploy/hpc/run_slurm.sh deploy/configs/turkiye.yaml
#   sbatch --nodes=8 --time=12:00:00 deploy/hpc/run_slurm.sh my-run.yaml   # override the defaults
#
# The run is resumable: submit the same command again after a time limit or a failure and
# finished tiles are skipped. Environment knobs (all optional):
#   CLC_DASK_ENV        conda env or venv (name or path) to activate; default: the submitting
#                       shell's environment, which sbatch passes on
#   CLC_DASK_WORKDIR    scheduler file and worker scratch (default: ./clc-dask-$SLURM_JOB_ID)
#   CLC_DASK_INTERFACE  network interface for Dask traffic, e.g. ib0
#   CLC_DASK_HOST       host address the scheduler and workers listen on
#   SCHEDULER_PORT      scheduler port (default 8786; 0 picks a free one)
#   DASHBOARD_ADDRESS   scheduler dashboard (default :8787)
#   WORKER_MEMORY       memory limit per worker (default: 90% of the job's memory per node)
#
#SBATCH --job-name=clc-dask-run
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --mem=64G
#SBATCH --time=24:00:00
#SBATCH --output=clc-dask-run-%j.log
set -euo pipefail

CONFIG="${1:-deploy/configs/turkiye.yaml}"
if [[ ! -f "$CONFIG" ]]; then
    echo "run config $CONFIG not found: pass its path as the first argument" >&2
    exit 2
fi

if [[ -n "${CLC_DASK_ENV:-}" ]]; then
    if [[ -f "$CLC_DASK_ENV/bin/activate" && ! -d "$CLC_DASK_ENV/conda-meta" ]]; then
        # shellcheck disable=SC1091
        source "$CLC_DASK_ENV/bin/activate"
    else
        eval "$(conda shell.bash hook)"
        conda activate "$CLC_DASK_ENV"
    fi
fi

NODES="${SLURM_NNODES:-1}"
THREADS="${SLURM_CPUS_PER_TASK:-1}"
WORKDIR="${CLC_DASK_WORKDIR:-$PWD/clc-dask-${SLURM_JOB_ID:-local}}"
SCHEDULER_FILE="$WORKDIR/scheduler.json"
WORKER_MEMORY="${WORKER_MEMORY:-$(( ${SLURM_MEM_PER_NODE:-4096} * 9 / 10 ))MiB}"
mkdir -p "$WORKDIR"
rm -f "$SCHEDULER_FILE"

net=()
if [[ -n "${CLC_DASK_INTERFACE:-}" ]]; then net+=(--interface "$CLC_DASK_INTERFACE"); fi
if [[ -n "${CLC_DASK_HOST:-}" ]]; then net+=(--host "$CLC_DASK_HOST"); fi

pids=()
cleanup() {
    for pid in ${pids[@]+"${pids[@]}"}; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

dask scheduler ${net[@]+"${net[@]}"} --port "${SCHEDULER_PORT:-8786}" \
    --dashboard-address "${DASHBOARD_ADDRESS:-:8787}" \
    --scheduler-file "$SCHEDULER_FILE" &
pids+=($!)

for _ in $(seq 120); do
    [[ -s "$SCHEDULER_FILE" ]] && break
    sleep 1
done
if [[ ! -s "$SCHEDULER_FILE" ]]; then
    echo "the Dask scheduler did not start within 120 s (no $SCHEDULER_FILE)" >&2
    exit 1
fi

# One worker per node, each with the node's GPU as the GPU resource.
srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --cpus-per-task="$THREADS" \
    dask worker ${net[@]+"${net[@]}"} --scheduler-file "$SCHEDULER_FILE" \
    --nthreads "$THREADS" --memory-limit "$WORKER_MEMORY" --resources GPU=1 \
    --local-directory "${TMPDIR:-$WORKDIR}" --no-dashboard &
pids+=($!)

python - "$SCHEDULER_FILE" "$NODES" <<'PY'
import sys

from distributed import Client

with Client(scheduler_file=sys.argv[1], timeout="60s") as client:
    client.wait_for_workers(int(sys.argv[2]), timeout=600)
    print(f"{len(client.scheduler_info()['workers'])} worker(s); dashboard {client.dashboard_link}")
PY

DASK_SCHEDULER_ADDRESS="$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["address"])' "$SCHEDULER_FILE")"
export DASK_SCHEDULER_ADDRESS

clc-dask run --config "$CONFIG" --resume
