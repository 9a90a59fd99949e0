"""Width maps of one space: the sparse ``S`` (out-map) and ``T`` (in-map) of DESIGN.md.

A space of old size ``d`` grows to ``D``. Every new coordinate ``i'`` either *copies* an old
coordinate ``src[i']`` (scaled by ``out_coef[i']`` when produced, read with ``in_coef[i']`` when
consumed), or is *new* (``src[i'] == -1``). New coordinates are filled by the space's residue rule:

* ``"zero"``   -- the producer writes 0 (RMSNorm residual stream, lossless with eps scaling);
* ``"mean"``   -- the producer writes the mean over old coordinates (LEMON's "average" expansion,
                  the only linear filling that keeps LayerNorm statistics);
* ``"random"`` -- the producer's fan-in is random and every consumer reads it with weight 0
                  (bert2BERT/G_zero-style new neurons; ffn, heads, kv only).

Dense matrices: ``S[i', src[i']] = out_coef[i']`` (+ the mean rows) and ``T[src[j'], j'] = in_coef[j']``.
The map is lossless when ``T S0 = I`` with ``S0`` = ``S`` without its residue rows, i.e. when every old
coordinate has copies whose ``in_coef`` sum to one.
"""
from __future__ import annotations

import math
import functools
from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class SpaceMap:
    """Width map of one named space. All tensors are indexed by new coordinate ``[D]``."""

    name: str
    old: int
    new: int
    src: torch.Tensor            # long [D]; -1 for new coordinates
    out_coef: torch.Tensor       # float64 [D]; S[i', src[i']]
    in_coef: torch.Tensor        # float64 [D]; T[src[j'], j']
    residue: str = "zero"        # "zero" | "mean" | "random": how new coordinates are produced
    copy: Optional[torch.Tensor] = None  # long [D]: copy index (staged coupling), -1 for new
    n_copies: int = 1            # copies per old coordinate when uniform (staged coupling / tied head)
    norm_scale: float = 1.0      # sqrt(s) gain on model-space norms (s = n*d/D)
    eps_scale: float = 1.0       # s, multiplies the norms' eps

    # Derived values below are computed once per map (a map is never modified after it is built; derive a
    # new one with dataclasses.replace). Callers must not modify the tensors they return in place.

    @functools.cached_property
    def is_identity(self) -> bool:
        return self.old == self.new and bool((self.src == torch.arange(self.old)).all()) and \
            bool((self.out_coef == 1).all()) and bool((self.in_coef == 1).all())

    @functools.cached_property
    def counts(self) -> torch.Tensor:
        """``[d]``: how many new coordinates copy each old one."""
        return torch.bincount(self.src[self.src >= 0], minlength=self.old)

    def S(self) -> torch.Tensor:
        """Dense out-map ``[D, d]`` (float64): produced features ``x' = S x``."""
        S = torch.zeros(self.new, self.old, dtype=torch.float64)
        keep = self.src >= 0
        S[keep.nonzero().squeeze(1), self.src[keep]] = self.out_coef[keep]
        if self.residue == "mean":
            S[~keep] = 1.0 / self.old
        return S

    def T(self) -> torch.Tensor:
        """Dense in-map ``[d, D]`` (float64): a consumer ``W`` reads grown features as ``W T``."""
        T = torch.zeros(self.old, self.new, dtype=torch.float64)
        keep = self.src >= 0
        T[self.src[keep], keep.nonzero().squeeze(1)] = self.in_coef[keep]
        return T

    def adjoint(self, out_side: bool) -> torch.Tensor:
        """``[D]``: (copies of the source) x (coefficient) per new coordinate; 0 for new ones.

        The adjoint moment rule divides a copied moment by the product of these over a tensor's axes.
        """
        return self._adjoints[bool(out_side)]

    @functools.cached_property
    def _adjoints(self):
        cnt = self.counts.to(torch.float64)
        keep = self.src >= 0
        out = {}
        for side, coef in ((True, self.out_coef), (False, self.in_coef)):
            adj = torch.zeros(self.new, dtype=torch.float64)
            adj[keep] = cnt[self.src[keep]] * coef[keep]
            out[side] = adj
        return out

    def expand_units(self, unit: int) -> "SpaceMap":
        """Lift a map over units (heads) to coordinates (``unit`` = head_dim)."""
        if unit == 1:
            return self
        offs = torch.arange(unit)
        src = torch.where(self.src[:, None] >= 0, self.src[:, None] * unit + offs, torch.full_like(offs, -1)).reshape(-1)
        rep = lambda t: None if t is None else t.repeat_interleave(unit)  # noqa: E731
        return SpaceMap(self.name, self.old * unit, self.new * unit, src, rep(self.out_coef), rep(self.in_coef),
                        self.residue, rep(self.copy), self.n_copies, self.norm_scale, self.eps_scale)


def identity_map(name: str, d: int) -> SpaceMap:
    ones = torch.ones(d, dtype=torch.float64)
    return SpaceMap(name, d, d, torch.arange(d), ones, ones.clone(), "zero", torch.zeros(d, dtype=torch.long))


def _from_src(name: str, old: int, src: torch.Tensor, residue: str) -> SpaceMap:
    """Map from a source index; ``in_coef`` splits each old coordinate equally over its copies."""
    new = src.numel()
    keep = src >= 0
    cnt = torch.bincount(src[keep], minlength=old).to(torch.float64)
    if (cnt == 0).any():
        missing = (cnt == 0).nonzero().squeeze(1)[:5].tolist()
        raise ValueError(f"{name}: old coordinates {missing} have no copy; growth would lose them")
    out_coef = keep.to(torch.float64)
    in_coef = torch.zeros(new, dtype=torch.float64)
    in_coef[keep] = 1.0 / cnt[src[keep]]
    copy = torch.full((new,), -1, dtype=torch.long)
    # copy index of each new coordinate = how many earlier new coordinates copy the same source
    seen = torch.zeros(old, dtype=torch.long)
    for i in keep.nonzero().squeeze(1).tolist():
        s = int(src[i])
        copy[i] = seen[s]
        seen[s] += 1
    n = int(cnt.max().item()) if bool((cnt == cnt[0]).all()) else 0
    return SpaceMap(name, old, new, src, out_coef, in_coef, residue, copy, n)


def circular_map(name: str, old: int, new: int) -> SpaceMap:
    """Copies ``i' -> i' mod d`` (Net2Net/LEMON circular; HyperCloning's appended copies)."""
    return _from_src(name, old, torch.arange(new) % old, "zero")


def extend_map(name: str, old: int, new: int, residue: str) -> SpaceMap:
    """Keep old coordinates in place; the ``new - old`` coordinates are filled by ``residue``."""
    src = torch.cat([torch.arange(old), torch.full((new - old,), -1, dtype=torch.long)])
    return _from_src(name, old, src, residue)


def model_space_map(old: int, new: int, flavour: str, allow_residue: bool, copies: bool = True) -> SpaceMap:
    """The residual stream: ``n = new // old`` full copies (or one if ``copies`` is False),
    the remaining coordinates hold the mean (LayerNorm) or zero (RMSNorm).

    Keeps each norm exact: with ``s = n * old / new`` the norm's input variance (or mean square) is
    ``s`` times the old one, so gains get ``sqrt(s)`` and eps gets ``s``.
    """
    n = new // old if copies else 1
    rest = new - n * old
    if rest and not allow_residue:
        raise ValueError(f"d_model: {old} -> {new} is not an integer multiple; this method keeps norms exact only "
                         f"for integer ratios (use width='lemon' or 'zero' for non-integer ratios)")
    residue = "mean" if flavour == "gpt2" else "zero"
    src = torch.cat([torch.arange(n * old) % old, torch.full((rest,), -1, dtype=torch.long)])
    m = _from_src("model", old, src, residue)
    s = n * old / new
    m.norm_scale, m.eps_scale, m.n_copies = math.sqrt(s), s, n
    return m


def head_maps(small_heads: int, small_kv: int, large_heads: int, large_kv: int, mode: str):
    """Head-level maps ``(heads, kv)`` that keep grouped-query attention consistent.

    Query head ``h`` reads kv head ``h // g`` (``g = heads / kv``). A new query head must copy an old
    query head whose kv head is the source of its own new kv head.

    ``mode="copy"``: kv heads copy circularly (``k' -> k' mod K``); the t-th copy of old group k fills
    its ``g'`` slots with that group's query heads, continuing circularly from the previous copy.
    ``mode="extend"``: old heads keep their group, new heads and new kv heads are new (``src = -1``).
    """
    g, g2 = small_heads // small_kv, large_heads // large_kv
    if mode == "copy":
        kv_src = torch.arange(large_kv) % small_kv
        copies = large_kv // small_kv
        if copies * g2 < g:
            raise ValueError(
                f"n_heads/n_kv_heads: {large_heads}/{large_kv} cannot hold copies of every query head of "
                f"{small_heads}/{small_kv} inside matching kv groups (each old group of {g} query heads gets "
                f"{copies} new group(s) of {g2})")
        q_src = torch.empty(large_heads, dtype=torch.long)
        for k2 in range(large_kv):
            k, t = k2 % small_kv, k2 // small_kv
            for r in range(g2):
                q_src[k2 * g2 + r] = k * g + (t * g2 + r) % g
        return q_src, kv_src
    if mode == "extend":
        if g2 < g:
            raise ValueError(f"n_heads/n_kv_heads: query group size shrinks {g} -> {g2}; new kv heads would be "
                             f"random, so old query heads could not keep their kv head (use a copying method)")
        kv_src = torch.cat([torch.arange(small_kv), torch.full((large_kv - small_kv,), -1, dtype=torch.long)])
        q_src = torch.full((large_heads,), -1, dtype=torch.long)
        for h in range(small_heads):
            q_src[(h // g) * g2 + h % g] = h
        return q_src, kv_src
    raise ValueError(f"unknown head mode {mode!r}")


def space_from_src(name: str, old: int, src: torch.Tensor, residue: str = "random") -> SpaceMap:
    return _from_src(name, old, src, residue)


def require_integer(name: str, old: int, new: int, method: str) -> int:
    if new % old:
        raise ValueError(f"{name}: {old} -> {new} is not an integer multiple, which {method!r} requires")
    return new // old


__all__: List[str] = ["SpaceMap", "identity_map", "circular_map", "extend_map", "model_space_map", "head_maps",
                      "space_from_src", "require_integer"]
