"""Dense (LiGO) growth of ZeRO partitions; moved to :mod:`growth_ds.distributed.zero.dense` (this name stays
importable)."""
from growth_ds.distributed.zero.dense import *  # noqa: F401,F403
from growth_ds.distributed.zero.dense import __all__  # noqa: F401
