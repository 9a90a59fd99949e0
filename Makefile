# Two entry points: `make demo` (the main job on the embedded default) and `make test`.
# Both build their own virtual environment; torch is pinned to the CPU build on disk.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
# DeepSpeed's JIT-built CPU ops are cached per virtual environment (two venvs sharing one cache rebuild each other)
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,deepspeed,megatron,hf]' $(TORCH)
	# DeepSpeed JIT-builds its CPU shared-memory collective at the first init (about a minute); do it once here
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
	touch $@

demo: venv
	$(VENV)/bin/growth-ds demo

test: venv
	$(PY) -m pytest -q -ra --durations=15 tests

clean:
	rm -rf $(VENV) build *.egg-info
