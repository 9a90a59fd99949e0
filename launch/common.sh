# Sourced by launch/torchrun.sh and launch/deepspeed.sh (not run on its own): what both do before building
# their command. Takes the caller's arguments: CONFIG is the first one (or $CONFIG), and is shifted off.
# Sets PY (the interpreter: GROWTH_DS_PYTHON, else this repo's .venv/bin/python, else python3; its folder goes
# first on PATH), NGPU (visible GPUs), MASTER_PORT (default 20000 + SLURM_JOB_ID % 20000 in Slurm, else
# 29500), and on a machine without GPUs DS_ACCELERATOR=cpu (DeepSpeed's CPU accelerator, gloo) and
# OMP_NUM_THREADS=1 unless they are set.

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
