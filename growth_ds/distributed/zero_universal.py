"""Offline growth of DeepSpeed checkpoints; moved to :mod:`growth_ds.distributed.zero.universal` (this name
stays importable)."""
from growth_ds.distributed.zero.universal import *  # noqa: F401,F403
from growth_ds.distributed.zero.universal import __all__  # noqa: F401
