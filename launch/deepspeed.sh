#!/usr/bin/env bash
# growth-ds staged pretraining under the `deepspeed` launcher: one node, or many through a hostfile.
#
#   launch/deepspeed.sh CONFIG [growth-ds train options...]
#
# Single node (all visible GPUs; NPROC_PER_NODE=2 for two CPU processes):
#   launch/deepspeed.sh configs/gpt2-124m-to-350m.yaml
# Multi-node from one node, DeepSpeed starts every node over pdsh/ssh (hostfile lines: `host slots=8`):
#   HOSTFILE=hostfile launch/deepspeed.sh configs/llama-1b-to-3b.yaml
# Multi-node without ssh: run this on every node with its own NODE_RANK (index in the hostfile):
#   HOSTFILE=hostfile NO_SSH=1 NODE_RANK=$i MASTER_ADDR=node0 launch/deepspeed.sh CONFIG
# Under Slurm, DeepSpeed starting the ranks with srun (what launch/slurm.sbatch does for LAUNCHER=deepspeed):
#   HOSTFILE=hostfile DS_LAUNCHER=slurm MASTER_ADDR=node0 launch/deepspeed.sh CONFIG
#
# Environment (defaults in brackets):
#   CONFIG            run config, if not given as the first argument
#   HOSTFILE          DeepSpeed hostfile (`host slots=N` per line); unset: this node only
#   NPROC_PER_NODE    processes per node (--num_gpus)  [all visible GPUs; the hostfile's slots]
#   NNODES            use the first NNODES hosts of the hostfile (--num_nodes)  [all]
#   NO_SSH=1          this call starts only this node's ranks (--no_ssh --node_rank NODE_RANK)
#   NODE_RANK         with NO_SSH=1                    [SLURM_NODEID, else 0]
#   DS_LAUNCHER       multi-node backend: pdsh, slurm, openmpi, mpich, impi, mvapich  [pdsh]
#   DS_LAUNCHER_ARGS  extra arguments for that backend (e.g. srun options)
#   MASTER_ADDR       rank-0 host  [127.0.0.1 single node / with NO_SSH: first hostfile host]
#   MASTER_PORT       [20000 + SLURM_JOB_ID % 20000 in Slurm, else 29500]
#   GROWTH_DS_PYTHON  interpreter with growth-ds installed [this repo's .venv/bin/python, else python3]
#   DRY_RUN=1         print the command instead of running it
#
# Remote nodes started over pdsh receive only PYTHON*/NCCL*/UCX* variables and those listed in a
# .deepspeed_env file (KEY=VALUE lines, in the current directory or ~/): put e.g. DS_ACCELERATOR
# or GROWTH_DS_OFFLINE there. Requeue-safe: `growth-ds train` resumes from the run directory's
# latest complete checkpoint, so the identical command continues a killed or requeued run.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"

if [[ $# -gt 0 && $1 != -* ]]; then
    CONFIG="$1"
    shift
fi
if [[ -z ${CONFIG:-} ]]; then
    echo "usage: $0 CONFIG [growth-ds train options]   (or CONFIG=... $0)" >&2
    exit 2
fi

if [[ -n ${GROWTH_DS_PYTHON:-} ]]; then
    PY="$GROWTH_DS_PYTHON"
elif [[ -x $REPO/.venv/bin/python ]]; then
    PY="$REPO/.venv/bin/python"
else
    PY="$(command -v python3 || command -v python)"
fi
export PATH="$(dirname "$PY"):$PATH"

gpu_count() {
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

NGPU="$(gpu_count)"
if [[ ${NGPU:-0} -eq 0 && -z ${DS_ACCELERATOR:-} ]]; then
    export DS_ACCELERATOR=cpu  # DeepSpeed's CPU accelerator and gloo
fi
if [[ ${NGPU:-0} -eq 0 ]]; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

if [[ -z ${MASTER_PORT:-} ]]; then
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
    else
        MASTER_PORT=29500
    fi
fi
DS_LAUNCHER="${DS_LAUNCHER:-pdsh}"
NO_SSH="${NO_SSH:-0}"

cmd=("$PY" -m deepspeed.launcher.runner --master_port "$MASTER_PORT")
script=(--module growth_ds.cli)
if [[ -n ${HOSTFILE:-} ]]; then
    if [[ ! -f $HOSTFILE ]]; then
        echo "$0: HOSTFILE $HOSTFILE does not exist" >&2
        exit 2
    fi
    cmd+=(--hostfile "$HOSTFILE")
    [[ -n ${NNODES:-} ]] && cmd+=(--num_nodes "$NNODES")
    if [[ $NO_SSH == 1 ]]; then
        if [[ -z ${MASTER_ADDR:-} ]]; then  # rank 0 lives on the hostfile's first host
            MASTER_ADDR="$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")"
        fi
        cmd+=(--force_multi --no_ssh --node_rank "${NODE_RANK:-${SLURM_NODEID:-0}}" --master_addr "$MASTER_ADDR")
        [[ -n ${NPROC_PER_NODE:-} ]] && cmd+=(--num_gpus "$NPROC_PER_NODE")
    else
        cmd+=(--force_multi --launcher "$DS_LAUNCHER")
        [[ -n ${MASTER_ADDR:-} ]] && cmd+=(--master_addr "$MASTER_ADDR")
        [[ -n ${DS_LAUNCHER_ARGS:-} ]] && cmd+=(--launcher_args "$DS_LAUNCHER_ARGS")
        if [[ $DS_LAUNCHER == pdsh ]]; then
            [[ -n ${NPROC_PER_NODE:-} ]] && cmd+=(--num_gpus "$NPROC_PER_NODE")
        else
            # Backends other than pdsh do not ssh; only pdsh needs the reachability check.
            cmd+=(--no_ssh_check)
            if [[ $DS_LAUNCHER == slurm ]]; then
                # The hostfile's slots are the ranks per node (--num_gpus would become srun
                # --gpus-per-node, wrong on CPU nodes). DeepSpeed's srun backend runs `python -u SCRIPT`
                # with neither --module nor the rank variables set, so a small generated script maps
                # SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID to RANK/WORLD_SIZE/LOCAL_RANK and runs growth-ds.
                shim_dir="${GROWTH_DS_CACHE:-$HOME/.cache/growth-ds}/launch"
                mkdir -p "$shim_dir"
                shim="$shim_dir/slurm_rank_env.py"
                tmp="$(mktemp "$shim_dir/.slurm_rank_env.XXXXXX")"
                cat >"$tmp" <<'PYEOF'
"""Generated by growth-ds launch/deepspeed.sh: srun task variables -> torch.distributed, then growth-ds."""
import os
import runpy
import sys

env = os.environ
if "RANK" not in env and "SLURM_PROCID" in env:
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
sys.argv[0] = "growth-ds"
runpy.run_module("growth_ds.cli", run_name="__main__")
PYEOF
                mv -f "$tmp" "$shim"
                script=("$shim")
            elif [[ -n ${NPROC_PER_NODE:-} ]]; then
                cmd+=(--num_gpus "$NPROC_PER_NODE")
            fi
        fi
    fi
else
    [[ -n ${NPROC_PER_NODE:-} ]] && cmd+=(--num_gpus "$NPROC_PER_NODE")
fi
cmd+=(--no_local_rank "${script[@]}" train "$CONFIG" "$@")

if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
if [[ -z ${HOSTFILE:-} ]]; then
    mode="this node"
elif [[ $NO_SSH == 1 ]]; then
    mode="hostfile $HOSTFILE, node rank ${NODE_RANK:-${SLURM_NODEID:-0}} (no ssh)"
else
    mode="hostfile $HOSTFILE, launcher $DS_LAUNCHER"
fi
echo "growth-ds deepspeed: $mode, master port $MASTER_PORT" >&2
exec "${cmd[@]}"
