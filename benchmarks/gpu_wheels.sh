#!/usr/bin/env bash
# The wheels `benchmarks/gpu_check.py --wheels DIR` installs on a bare GPU machine (Python 3.12, torch and Triton
# present, no network): our dependencies that torch does not bring, as CPython 3.12 manylinux wheels, and
# DeepSpeed (an sdist on PyPI) built here into a pure-Python wheel. Run where PyPI is reachable:
#
#   bash benchmarks/gpu_wheels.sh wheels          # then carry `wheels` with the device command
#
# Nothing here installs anything; torch is never downloaded.
set -euo pipefail
DEST=${1:-wheels}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
DS_VERSION=$(sed -n 's/.*"deepspeed==\([0-9.]*\)".*/\1/p' "$(dirname "$0")/../setup.py")
# binary wheels for the device's interpreter (cp312, x86-64 manylinux); --no-deps: the list is complete
"$PY" -m pip download --quiet --dest "$DEST" --only-binary=:all: --no-deps \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any \
    pyyaml sentencepiece safetensors tqdm scipy hjson msgpack ninja py-cpuinfo psutil packaging einops \
    pydantic pydantic-core annotated-types typing-extensions typing-inspection
# DeepSpeed: build its wheel here (no compiled ops: they are built just in time where needed, and growth-ds
# uses torch's AdamW, so none is)
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$DEST" \
    "deepspeed==${DS_VERSION}" 2>/dev/null \
  || DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --wheel-dir "$DEST" "deepspeed==${DS_VERSION}"
ls -1 "$DEST"
du -sh "$DEST"
