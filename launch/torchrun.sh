#!/usr/bin/env bash
# growth-ds staged pretraining under torchrun: one node, or one call per node for multi-node jobs.
#
#   launch/torchrun.sh CONFIG [growth-ds train options...]
#
# Single node, 8 GPUs (or 2 CPU processes with NPROC_PER_NODE=2):
#   NPROC_PER_NODE=8 launch/torchrun.sh configs/gpt2-124m-to-350m.yaml
# Multi-node: run the same line on every node (launch/slurm.sbatch does it through srun):
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 MASTER_PORT=29510 NPROC_PER_NODE=8 launch/torchrun.sh CONFIG
#
# Environment (defaults in brackets; the SLURM_* ones apply inside a Slurm job step):
#   CONFIG            run config, if not given as the first argument
#   NNODES            nodes                               [SLURM_NNODES, else 1]
#   NODE_RANK         this node's index                   [SLURM_NODEID, else 0]
#   NPROC_PER_NODE    processes on this node              [visible GPUs, else 1]
#   MASTER_ADDR       rank-0 host                         [first host of SLURM_JOB_NODELIST, else 127.0.0.1]
#   MASTER_PORT       rendezvous port                     [20000 + SLURM_JOB_ID % 20000, else 29500]
#   RDZV_BACKEND      static (fixed NODE_RANK) or c10d (elastic rendezvous at MASTER_ADDR:MASTER_PORT) [static]
#   GROWTH_DS_PYTHON  interpreter with growth-ds installed [this repo's .venv/bin/python, else python3]
#   DRY_RUN=1         print the command instead of running it
#
# Requeue-safe: `growth-ds train` resumes from RUN_DIR/checkpoints/latest.json whenever it exists,
# so re-running the identical command after a kill, preemption or requeue continues the run.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"

source "$HERE/common.sh"  # CONFIG, PY, NGPU, MASTER_PORT; DS_ACCELERATOR/OMP_NUM_THREADS without GPUs

first_slurm_host() {
    scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1
}

NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
if [[ -z ${NPROC_PER_NODE:-} ]]; then
    NPROC_PER_NODE=$(( NGPU > 0 ? NGPU : 1 ))
fi
if [[ -z ${MASTER_ADDR:-} ]]; then
    if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
        MASTER_ADDR="$(first_slurm_host)"
    fi
    MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
fi
RDZV_BACKEND="${RDZV_BACKEND:-static}"

cmd=("$PY" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE")
case "$RDZV_BACKEND" in
    static)
        cmd+=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT") ;;
    c10d)
        cmd+=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"
              --rdzv_id "${RDZV_ID:-${SLURM_JOB_ID:-growth-ds}}") ;;
    *)
        echo "$0: RDZV_BACKEND must be static or c10d, got '$RDZV_BACKEND'" >&2
        exit 2 ;;
esac
cmd+=(-m growth_ds.cli train "$CONFIG" "$@")

if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
echo "growth-ds torchrun: node $NODE_RANK/$NNODES, $NPROC_PER_NODE process(es), master $MASTER_ADDR:$MASTER_PORT" >&2
exec "${cmd[@]}"
