"""GrowthPlan: a small -> large growth as plain data, and the builders of every method.

A plan holds, per space, a width map (:class:`~growth_ds.ops.spaces.SpaceMap`), a depth map (for each
new layer: its source layer and whether it is a copy or an identity block), how 2-D weights couple
copies (``full`` or staged training's ``block`` diagonal), the symmetry-breaking noise, the rule for
Adam moments and the LR policy. Applying it (:func:`growth_ds.ops.apply.grow`) is a separate step, so
the same plan can be executed on full tensors, ZeRO partitions or TP shards.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from growth_ds.ops.lr import LRPolicy
from growth_ds.ops.spaces import (SpaceMap, circular_map, extend_map, head_maps, identity_map, model_space_map,
                                  require_integer, space_from_src)
from growth_ds.shapes import ModelShape, validate_growth

#: method -> which axes it acts on and whether it preserves the function there (None: does not act).
METHODS: Dict[str, Dict[str, Optional[bool]]] = {
    "duplicate": {"width_lossless": True, "depth_lossless": None},
    "lemon": {"width_lossless": True, "depth_lossless": None},
    "zero": {"width_lossless": True, "depth_lossless": None},
    "hypercloning": {"width_lossless": True, "depth_lossless": None},
    "staged": {"width_lossless": True, "depth_lossless": None},
    "stack": {"width_lossless": None, "depth_lossless": False},
    "interleave": {"width_lossless": None, "depth_lossless": False},
    "identity": {"width_lossless": None, "depth_lossless": True},
}
WIDTH_METHODS = tuple(m for m, v in METHODS.items() if v["width_lossless"] is not None)
DEPTH_METHODS = tuple(m for m, v in METHODS.items() if v["depth_lossless"] is not None)

#: the optimizer-state rule each paper prescribes (see ``growth_ds.ops.apply``)
DEFAULT_MOMENTS = {
    "duplicate": "reset",     # bert2BERT / Net2Net: fresh optimizer
    "lemon": "reset",         # LEMON: fresh optimizer
    "zero": "adjoint",        # MSG: old moments kept, zero for new entries, step kept
    "hypercloning": "reset",  # HyperCloning: weights only
    "staged": "adjoint",      # staged training: m/n, v/n^2 on copies, zero off-diagonal, step kept
    "stack": "reset",         # G_stack: fresh AdamW
    "interleave": "adjoint",  # staged training's depth operator copies the source layer's moments
    "identity": "adjoint",    # copied moments for old layers; new blocks start at zero
}
DEFAULT_LR = {"staged": "rewarm", "lemon": "lemon", "stack": "restart"}
MOMENT_RULES = ("adjoint", "reset")

#: ``make_plan(..., recipe="recommended")``: the growth the saving study (benchmarks/saving.py, README
#: "Results") found best at its scale, for whichever axes grow: new width units with random fan-in and
#: zero fan-out (lossless), the layer stack repeated (G_stack; not lossless: ``identity`` is the lossless
#: depth method, a little behind it in the study), Adam moments kept for old entries and zero for new ones,
#: the LR schedule continued (under WSD: growth in the stable phase, the decay at the run's end).
#: The new units' random fan-in at twice the std of the old weight each joins (the fifth screen: 0.5 / 1 / 1.5 / 2 x
#: the old std; an absolute std is tied to one model's weight scale).
RECIPES = {"recommended": {"width": "zero", "depth": "stack", "moments": "adjoint", "lr": "continue",
                           "random_std": 2.0, "random_relative": True}}
DEFAULT_RANDOM_STD = 0.02           # the new units' fan-in std when absolute (the usual init)
DEFAULT_RELATIVE_RANDOM_STD = 1.0   # ... when relative to the old weight's std
LEMON_NOISE_STD = 0.02  # LEMON draws the asymmetric fan-in split from the large model's init


@dataclass
class DepthEntry:
    """New layer: built from old layer ``source``; ``identity`` blocks have zero residual outputs."""

    source: int
    kind: str = "copy"  # "copy" | "identity"


@dataclass
class GrowthPlan:
    """Pure data describing one growth. Build with :func:`make_plan`."""

    small: ModelShape
    large: ModelShape
    width: Optional[str]
    depth: Optional[str]
    spaces: Dict[str, SpaceMap]           # coordinate-level maps: model, ffn, heads, kv, vocab, pos
    layers: List[DepthEntry]              # one per new layer
    coupling: str = "full"                # "full" | "block" (staged training's block-diagonal weights)
    noise: str = "none"                   # "none" | "zero_sum" (fan-in noise summing to 0 over copies)
    noise_std: float = 0.0                # absolute std, or relative to the weight's std if noise_relative
    noise_relative: bool = False
    random_std: float = DEFAULT_RANDOM_STD  # std of random fan-in of new units (zero / lemon residue)
    random_relative: bool = False         # random_std is relative to the std of the whole old weight
    moments: str = "adjoint"
    lr: LRPolicy = field(default_factory=LRPolicy)
    seed: int = 0

    @property
    def grown_shape(self) -> ModelShape:
        """The large shape with the norms' eps rescaled by the model-space map (1.0 for integer ratios)."""
        return dataclasses.replace(self.large, norm_eps=self.small.norm_eps * self.spaces["model"].eps_scale)

    @property
    def lossless(self) -> bool:
        w = METHODS[self.width]["width_lossless"] if self.width else True
        d = METHODS[self.depth]["depth_lossless"] if self.depth else True
        return bool(w) and bool(d)

    def describe(self) -> str:
        parts = [f"{self.small.describe()}  ->  {self.large.describe()}",
                 f"width={self.width} depth={self.depth} coupling={self.coupling} noise={self.noise} "
                 f"moments={self.moments} lr={self.lr.kind} lossless={self.lossless} "
                 f"fan_in_std={self.random_std:g}{' x old std' if self.random_relative else ''}"]
        return "\n".join(parts)


def _width_spaces(small: ModelShape, large: ModelShape, method: str) -> dict:
    hd = small.head_dim
    if method in ("hypercloning", "staged"):
        for name in ("d_model", "d_ffn", "n_heads", "n_kv_heads"):
            require_integer(name, getattr(small, name), getattr(large, name), method)
    if method == "zero":
        model = model_space_map(small.d_model, large.d_model, small.flavour, allow_residue=True, copies=False)
        ffn = extend_map("ffn", small.d_ffn, large.d_ffn, "random")
        q_src, kv_src = head_maps(small.n_heads, small.n_kv_heads, large.n_heads, large.n_kv_heads, "extend")
    else:
        model = model_space_map(small.d_model, large.d_model, small.flavour, allow_residue=(method == "lemon"))
        ffn = circular_map("ffn", small.d_ffn, large.d_ffn)
        q_src, kv_src = head_maps(small.n_heads, small.n_kv_heads, large.n_heads, large.n_kv_heads, "copy")
    heads = space_from_src("heads", small.n_heads, q_src).expand_units(hd)
    kv = space_from_src("kv", small.n_kv_heads, kv_src).expand_units(hd)
    return {"model": model, "ffn": ffn, "heads": heads, "kv": kv}


def _depth_layers(small: ModelShape, large: ModelShape, method: Optional[str],
                  positions: Optional[Sequence[int]]) -> List[DepthEntry]:
    L, L2 = small.n_layers, large.n_layers
    if method is None or L == L2:
        if positions:
            raise ValueError("positions: given, but the depth does not grow")
        return [DepthEntry(i) for i in range(L2)] if L == L2 else []
    if method == "stack":  # G_stack (Du et al. 2024): the whole stack repeated
        return [DepthEntry(i % L) for i in range(L2)]
    if method == "interleave":  # each layer followed by its copies (staged training's "alternate")
        return [DepthEntry(i * L // L2) for i in range(L2)]
    if method == "identity":  # LLaMA-Pro / LEMON: new blocks copy the layer below, residual outputs zeroed
        k = L2 - L
        if positions is None:  # one new block after every L/k old layers (LLaMA-Pro's spacing)
            after = [(j + 1) * L // k - 1 for j in range(k)]
            positions = [a + j + 1 for j, a in enumerate(sorted(after))]
        positions = sorted(int(p) for p in positions)
        if len(positions) != k or len(set(positions)) != k or any(p < 0 or p >= L2 for p in positions):
            raise ValueError(f"positions: need {k} distinct indices in [0, {L2}) for the new identity blocks, "
                             f"got {list(positions)}")
        layers, old = [], 0
        for i in range(L2):
            if i in positions:
                layers.append(DepthEntry(max(old - 1, 0), "identity"))
            else:
                layers.append(DepthEntry(old))
                old += 1
        return layers
    raise ValueError(f"depth: unknown depth method {method!r}; choose from {DEPTH_METHODS}")


def make_plan(small: ModelShape, large: ModelShape, width: Optional[str] = None, depth: Optional[str] = None,
              seed: int = 0, *, moments: Optional[str] = None, lr: Optional[LRPolicy | str] = None,
              positions: Optional[Sequence[int]] = None, noise_std: Optional[float] = None,
              snr_db: float = 10.0, recipe: Optional[str] = None, random_std: Optional[float] = None,
              random_relative: Optional[bool] = None) -> GrowthPlan:
    """Plan the growth of ``small`` into ``large``.

    Args:
        width: one of ``duplicate`` (Net2Net, Chen et al. 2016 / bert2BERT FPI, Chen et al. 2022),
            ``lemon`` (Wang et al. 2024), ``zero`` (bert2BERT/MSG-style new neurons; G_zero of Du et al. 2024),
            ``hypercloning`` (Samragh et al. 2024), ``staged`` (Shen et al. 2022, any integer factor).
            Required when any width dimension grows.
        depth: ``stack`` (G_stack, Du et al. 2024; not lossless), ``interleave`` (staged training's
            "alternate" copy; not lossless) or ``identity`` (LLaMA-Pro, Wu et al. 2024 / LEMON).
            Required when ``n_layers`` grows.
        seed: keys every random part (noise, new units) together with the parameter name, so results
            never depend on sharding.
        moments: ``adjoint`` or ``reset``; default: the rule of the width method's paper
            (the depth method's when only depth grows).
        lr: an :class:`LRPolicy` or its kind; default: the method's paper (staged: ``rewarm``,
            lemon: ``lemon``, stack: ``restart``, others ``continue``).
        positions: indices in the new model of the ``identity`` blocks.
        noise_std: std of LEMON's random fan-in split (default 0.02) or, for hypercloning, overrides
            the relative noise given by ``snr_db``.
        recipe: ``"recommended"`` (:data:`RECIPES`) fills whatever of width, depth, moments, lr and the
            new units' fan-in is not given, for the axes that grow.
        random_std: std of the random fan-in of new units (``zero`` width, the residue columns of
            ``lemon``/``duplicate``'s new model coordinates); default: the recipe's when the mode below is
            the recipe's, else 0.02 (absolute) or 1.0 (relative).
        random_relative: ``random_std`` is a multiple of the std of the whole old weight each new unit
            joins (so the new units start at the scale the trained weights reached, whatever the model);
            default: the recipe's, else False.

    Raises ``ValueError`` naming the field for any growth the method cannot do exactly.
    """
    if not isinstance(small, ModelShape) or not isinstance(large, ModelShape):
        raise TypeError("make_plan(small, large, ...) takes two ModelShape objects")
    validate_growth(small, large)
    widens = any(getattr(small, f) != getattr(large, f) for f in ("d_model", "d_ffn", "n_heads", "n_kv_heads"))
    if recipe is not None:
        if recipe not in RECIPES:
            raise ValueError(f"recipe: unknown recipe {recipe!r}; choose from {tuple(RECIPES)}")
        r = RECIPES[recipe]
        width = width or (r["width"] if widens else None)
        depth = depth or (r["depth"] if large.n_layers != small.n_layers else None)
        moments = moments or r["moments"]
        lr = lr or r["lr"]
        r_relative = bool(r.get("random_relative", False))
        if random_std is None and (random_relative is None or bool(random_relative) == r_relative):
            random_std = r.get("random_std")
        random_relative = r_relative if random_relative is None else random_relative
    if width is not None and width not in WIDTH_METHODS:
        raise ValueError(f"width: unknown width method {width!r}; choose from {WIDTH_METHODS}")
    if depth is not None and depth not in DEPTH_METHODS:
        raise ValueError(f"depth: unknown depth method {depth!r}; choose from {DEPTH_METHODS}")
    if widens and width is None:
        raise ValueError(f"width: the width grows but no width method was given; choose from {WIDTH_METHODS} "
                         f"(or recipe='recommended')")
    if large.n_layers != small.n_layers and depth is None:
        raise ValueError(f"depth: n_layers grows {small.n_layers} -> {large.n_layers} but no depth method was given; "
                         f"choose from {DEPTH_METHODS} (or recipe='recommended')")
    if moments is not None and moments not in MOMENT_RULES:
        raise ValueError(f"moments: must be one of {MOMENT_RULES}, got {moments!r}")
    if random_std is not None and (isinstance(random_std, bool) or not isinstance(random_std, (int, float))
                                   or not math.isfinite(random_std) or random_std < 0):
        raise ValueError(f"random_std: must be a finite number >= 0, got {random_std!r}")

    if width is not None:
        spaces = _width_spaces(small, large, width)
    else:
        spaces = {s: identity_map(s, small.space_dim(s)) for s in ("model", "ffn", "heads", "kv")}
    spaces["vocab"] = identity_map("vocab", small.vocab_size)
    spaces["pos"] = extend_map("pos", small.max_seq_len, large.max_seq_len, "zero")
    layers = _depth_layers(small, large, depth, positions)

    plan = GrowthPlan(small, large, width, depth, spaces, layers, seed=seed)
    plan.random_relative = bool(random_relative)
    if random_std is None:
        random_std = DEFAULT_RELATIVE_RANDOM_STD if plan.random_relative else DEFAULT_RANDOM_STD
    plan.random_std = float(random_std)
    if width == "staged":
        plan.coupling = "block"
    if width == "lemon":
        plan.noise, plan.noise_std = "zero_sum", LEMON_NOISE_STD if noise_std is None else noise_std
    if width == "hypercloning":
        plan.noise, plan.noise_relative = "zero_sum", noise_std is None
        plan.noise_std = 10 ** (-snr_db / 20) if noise_std is None else noise_std
    lead = width if widens or depth is None else depth
    plan.moments = moments or DEFAULT_MOMENTS.get(lead or "", "adjoint")
    if isinstance(lr, LRPolicy):
        plan.lr = lr
    else:
        plan.lr = LRPolicy(lr or DEFAULT_LR.get(lead or "", "continue"))
    return plan
