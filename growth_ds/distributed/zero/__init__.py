"""ZeRO-sharded growth: every rank grows its own DeepSpeed partitions of the weights and Adam state.

    new = build the grown engine (ZeRO-3: under zero.Init) ; materialise its Adam state
    grow_engine(old, new, plan)          # fp32 masters, exp_avg, exp_avg_sq, step, low-precision weights

No rank ever gathers a parameter. DeepSpeed fixes where every element lives (:mod:`.layout`): ZeRO-1/2 split
the flat fp32 buffer of each param group into equal contiguous partitions, ZeRO-3 splits every parameter into
``ceil(numel / ws)`` elements per rank. For each new parameter each rank knows, from global metadata alone,
which new elements it owns, which old elements those are made of (:mod:`.param_growth`) and who owns them,
so the exchange needs no request round: a schedule of rounds and per-round plans is built first
(:mod:`.schedule`), then old owners pack exactly the elements every rank needs and one transfer per round
moves them (:mod:`.exchange`: an all-to-all, or same-host shared memory, :mod:`.shm`). Each rank then
replays the reference arithmetic (``growth_ds.ops.apply``) on its rows and writes its own slices: in float32,
in place, where every factor is a power of two (duplication, staged training, depth copies: provably the
same bits), else in float64 a few rows at a time. The result is bit-identical to ``growth_ds.ops.grow`` on
the full state, at any world size, ZeRO stage, bucket size and transport.

Memory per rank, besides the two engines' own partitions: the exchange buffers of one bucket (by default
sized so that the buffers every rank measures stay under 3/4 of the largest fp32 parameter); float64 work
space for rows the exact slow path computes; O(sum of space sizes) index vectors, plus, only for parameters
that need a whole-parameter reduction (GPT-2 mean rows of a non-integer ``d_model`` growth, HyperCloning's
relative noise), that one old parameter in float64 on one designated rank, in a round of its own. Never the
model. Old and new engine may differ in ZeRO stage (1, 2 or 3) and precision; they share the data-parallel
group.

Modules, bottom up: ``intervals`` (flat-range math), ``old_data`` (what a rank received), ``param_growth``
(one parameter's arithmetic: the float64 replay and its float32 fast paths), ``layout`` (DeepSpeed's
partitions: every DeepSpeed internal the executor reads), ``schedule`` (rounds and per-round plans),
``shm`` and ``exchange`` (transports and packing), ``engine`` (``grow_engine``: set up, negotiate, run the
rounds, finish), ``dense`` (LiGO's dense maps: partial products reduce-scattered), ``universal`` (offline
growth of DeepSpeed checkpoints), ``memory`` (tensor accounting for tests and benchmarks).
"""
from growth_ds.distributed.zero.engine import KILL_ENV, Agreement, gather_grow, grow_any, grow_engine, is_partitioned
from growth_ds.distributed.zero.layout import Slot, ZeroLayout
from growth_ds.distributed.zero.schedule import DEFAULT_BUCKET_ELEMS, auto_bucket
from growth_ds.distributed.zero.stats import GrowthStats

__all__ = ["DEFAULT_BUCKET_ELEMS", "Agreement", "GrowthStats", "KILL_ENV", "Slot", "ZeroLayout", "auto_bucket",
           "gather_grow", "grow_any", "grow_engine", "is_partitioned"]
