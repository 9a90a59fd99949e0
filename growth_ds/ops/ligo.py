"""LiGO: the learned linear growth operator (Wang et al., ICLR 2023), for GPT-2 and Llama flavours.

The large model's parameters are a linear function of the frozen small model's::

    W'_l = (S_b,l (sum_j D_k[l, j] W_j) T_a,l) * K + N        (kind k of layer l; b, a: its out/in spaces)

``S`` (LiGO's ``B``) and ``T`` (LiGO's ``A^T``) are dense, learned width maps; ``D_k`` is a learned
``L' x L`` depth mixing per module kind (q, k, v, o, gate, up, down, norms), as in the official code and
G_stack's Llama re-implementation. The paper's tying is kept: one residual-stream pair ``(S_model,
T_model)`` shared by embeddings, every residual read and write and the output layer; per target layer
pairs for the attention heads (``S_heads``/``T_heads``; ``S_k``/``S_v`` for the KV heads under GQA, with
head_dim fixed for RoPE) and the FFN (``S_ffn``/``T_ffn``, shared by gate and up); norm gains have their
own shared maps. Two deliberate differences from the paper, both needed so that step 0 equals a fixed
lossless plan's model *exactly*: (1) in-maps ``T`` are learned separately instead of tied to ``S^T``
(function preservation needs ``T S = I``, which ``S^T S`` is not for duplication), and (2) the fixed
plan's function-preserving random part ``N`` and staged coupling ``K`` stay as constants.

The large model is never held as trainable parameters: :meth:`LigoOperator.forward` materialises
``{name: tensor}`` from (operator parameters, frozen small weights) and evaluates the reference decoder
with ``torch.func.functional_call``. Expansions go through :func:`growth_ds.kernels.kron_expand`
(Triton on CUDA, the torch reference elsewhere).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict

import torch
import torch.nn as nn

from growth_ds.kernels import kron_expand
from growth_ds.models import Decoder
from growth_ds.models.schema import parameter_schema
from growth_ds.ops.apply import grow_moment
from growth_ds.ops.noise import needs_full_std, noise_window
from growth_ds.ops.roles import coupling
from growth_ds.ops.plan import GrowthPlan
from growth_ds.ops.state import TrainingState

if TYPE_CHECKING:
    from growth_ds.ops.dense import DenseMap

LAYER_KINDS = ("attn_norm", "attn.q", "attn.k", "attn.v", "attn.o", "mlp_norm", "mlp.gate", "mlp.up", "mlp.down")


def _norm_map(plan: GrowthPlan, final: bool, gain: bool) -> tuple:
    """(matrix [D, d], offset [D]) with norm' = matrix @ norm + offset, exactly the plan's norm rule."""
    m = plan.spaces["model"]
    scale = m.norm_scale if gain else 1.0
    if final and plan.small.tied_embeddings:
        scale /= max(m.n_copies, 1)
    G = torch.zeros(m.new, m.old, dtype=torch.float64)
    keep = m.src >= 0
    G[keep.nonzero().squeeze(1), m.src[keep]] = scale
    offset = torch.zeros(m.new, dtype=torch.float64)
    if gain:
        offset[~keep] = scale
    return G, offset


class LigoOperator(nn.Module):
    """Learnable growth operator initialised from a fixed lossless ``plan`` (step 0 == that plan)."""

    def __init__(self, plan: GrowthPlan, small_params: Dict[str, torch.Tensor]):
        super().__init__()
        self.plan = plan
        self.small_shape, self.shape = plan.small, plan.grown_shape
        self.L, self.L2 = plan.small.n_layers, plan.grown_shape.n_layers
        sp = plan.spaces
        f32 = lambda t: nn.Parameter(t.to(torch.float32).clone())  # noqa: E731
        stack = lambda t: nn.Parameter(t.to(torch.float32).unsqueeze(0).repeat(self.L2, 1, 1))  # noqa: E731
        self.S_model, self.T_model = f32(sp["model"].S()), f32(sp["model"].T())
        self.S_heads, self.T_heads = stack(sp["heads"].S()), stack(sp["heads"].T())
        self.S_k, self.S_v = stack(sp["kv"].S()), stack(sp["kv"].S())
        self.S_ffn, self.T_ffn = stack(sp["ffn"].S()), stack(sp["ffn"].T())
        self.G_norm, self.G_final = f32(_norm_map(plan, False, True)[0]), f32(_norm_map(plan, True, True)[0])
        if self.shape.flavour == "gpt2":  # LayerNorm shifts
            self.Gb_norm, self.Gb_final = f32(_norm_map(plan, False, False)[0]), f32(_norm_map(plan, True, False)[0])
        for name, (fin, g) in {"norm_off": (0, 1), "final_off": (1, 1)}.items():
            self.register_buffer(name, _norm_map(plan, fin, g)[1].to(torch.float32))
        self.depth = nn.ParameterDict()
        for kind in LAYER_KINDS:
            D = torch.zeros(self.L2, self.L)
            for l, entry in enumerate(plan.layers):
                if not (entry.kind == "identity" and kind in ("attn.o", "mlp.down")):
                    D[l, entry.source] = 1.0
            self.depth[kind.replace(".", "_")] = nn.Parameter(D)
        # frozen small weights and the plan's constant parts
        self.small = {n: t.detach().to(torch.float32).clone() for n, t in small_params.items()}
        self.constants: Dict[str, torch.Tensor] = {}
        self.couplings: Dict[str, torch.Tensor] = {}
        from growth_ds.ops.apply import is_identity_block, source_name

        for name, spec in parameter_schema(self.shape).items():
            if spec.role in ("weight", "head") and not (spec.residual_out and is_identity_block(plan, name)):
                w = self.small[source_name(plan, name)]
                N = noise_window(plan, name, spec, full_std=float(w.double().std()) if needs_full_std(plan, spec)
                                 else None)
                if N.abs().max() > 0:
                    self.constants[name] = N.to(torch.float32)
                K = coupling(plan, spec)
                if K is not None:
                    self.couplings[name] = K.rows().to(torch.float32)
        self.skeleton = Decoder(self.shape).requires_grad_(False)

    # ---- materialisation ------------------------------------------------------------------------
    def _stack(self, suffix: str) -> torch.Tensor:
        return torch.stack([self.small[f"layers.{j}.{suffix}"] for j in range(self.L)])

    def _maps(self, module: str):
        """(S_out [L2?, M, P], T_in^T [L2?, N, Q]) of a layer module."""
        Tm = self.T_model.t()
        return {
            "attn.q": (self.S_heads, Tm), "attn.k": (self.S_k, Tm), "attn.v": (self.S_v, Tm),
            "attn.o": (self.S_model, self.T_heads.transpose(1, 2)),
            "mlp.gate": (self.S_ffn, Tm), "mlp.up": (self.S_ffn, Tm),
            "mlp.down": (self.S_model, self.T_ffn.transpose(1, 2)),
        }[module]

    def materialise(self) -> Dict[str, torch.Tensor]:
        """``{name: tensor}`` of the large model, differentiable w.r.t. the operator parameters."""
        out: Dict[str, torch.Tensor] = {}
        schema = parameter_schema(self.shape)
        pos = self.plan.spaces["pos"]
        out["tok_emb.weight"] = self.small["tok_emb.weight"] @ self.S_model.t()
        if "pos_emb.weight" in schema:
            rows = self.small["pos_emb.weight"].index_select(0, pos.src.clamp(min=0)) * (pos.src >= 0)[:, None]
            out["pos_emb.weight"] = rows @ self.S_model.t()
        for kind in LAYER_KINDS:
            D = self.depth[kind.replace(".", "_")]
            names = [n for n in schema if n.startswith("layers.0.") and schema[n].module == kind]
            for n0 in names:
                suffix = n0[len("layers.0."):]
                W = self._stack(suffix)
                spec = schema[n0]
                if spec.role == "norm":
                    grown = (D @ W) @ self.G_norm.t() + self.norm_off
                elif spec.role == "norm_bias":
                    grown = (D @ W) @ self.Gb_norm.t()
                elif spec.role == "bias":
                    S = self._maps(kind)[0]
                    grown = (D @ W) @ S.t() if S.dim() == 2 else torch.einsum("lmp,lp->lm", S, D @ W)
                else:
                    S, A = self._maps(kind)
                    grown = kron_expand(W, D, S, A)
                for l in range(self.L2):
                    name = f"layers.{l}.{suffix}"
                    w = grown[l]
                    if name in self.couplings:
                        w = w * self.couplings[name]
                    if name in self.constants:
                        w = w + self.constants[name]
                    out[name] = w
        out["norm.weight"] = self.G_final @ self.small["norm.weight"] + self.final_off
        if "norm.bias" in schema:
            out["norm.bias"] = self.Gb_final @ self.small["norm.bias"]
        if "lm_head.weight" in schema:
            w = self.small["lm_head.weight"] @ self.T_model
            if "lm_head.weight" in self.couplings:
                w = w * self.couplings["lm_head.weight"]
            out["lm_head.weight"] = w + self.constants.get("lm_head.weight", 0)
        return out

    @torch.no_grad()
    def dense_maps(self) -> Dict[str, "DenseMap"]:
        """The operator as one :class:`~growth_ds.ops.dense.DenseMap` per grown parameter (float64, detached):
        ``apply_dense(maps[n], small) == materialise()[n]``. This is what the ZeRO executor needs to build
        each rank's partitions of the grown model from the old partitions (no rank materialises the model)."""
        from growth_ds.ops.dense import DenseMap

        f64 = lambda t: None if t is None else t.detach().to(torch.float64)  # noqa: E731
        schema = parameter_schema(self.shape)
        maps: Dict[str, DenseMap] = {}
        pos = self.plan.spaces["pos"]
        maps["tok_emb.weight"] = DenseMap("tok_emb.weight", None, f64(self.S_model.t()))
        if "pos_emb.weight" in schema:
            sel = torch.zeros(pos.new, pos.old, dtype=torch.float64)
            keep = (pos.src >= 0).nonzero().squeeze(1)
            sel[keep, pos.src[keep]] = 1.0
            maps["pos_emb.weight"] = DenseMap("pos_emb.weight", sel, f64(self.S_model.t()))
        for kind in LAYER_KINDS:
            D = self.depth[kind.replace(".", "_")].detach()
            for n0 in [n for n in schema if n.startswith("layers.0.") and schema[n].module == kind]:
                suffix, spec = n0[len("layers.0."):], schema[n0]
                for l in range(self.L2):
                    name = f"layers.{l}.{suffix}"
                    sources = [(f"layers.{j}.{suffix}", float(D[l, j])) for j in range(self.L)]
                    shift = None
                    if spec.role == "norm":
                        B, A, shift = self.G_norm, None, self.norm_off
                    elif spec.role == "norm_bias":
                        B, A = self.Gb_norm, None
                    elif spec.role == "bias":
                        S = self._maps(kind)[0]
                        B, A = (S[l] if S.dim() == 3 else S), None
                    else:
                        S, At = self._maps(kind)
                        B = S[l] if S.dim() == 3 else S
                        A = (At[l] if At.dim() == 3 else At).t()
                    shift = self.constants.get(name, shift)
                    maps[name] = DenseMap(sources, f64(B), f64(A), f64(self.couplings.get(name)), f64(shift))
        maps["norm.weight"] = DenseMap("norm.weight", f64(self.G_final), None, None, f64(self.final_off))
        if "norm.bias" in schema:
            maps["norm.bias"] = DenseMap("norm.bias", f64(self.Gb_final), None)
        if "lm_head.weight" in schema:
            maps["lm_head.weight"] = DenseMap("lm_head.weight", None, f64(self.T_model),
                                              f64(self.couplings.get("lm_head.weight")),
                                              f64(self.constants.get("lm_head.weight")))
        return maps

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the large model ``M(theta_small)`` for ``tokens[B, T]``."""
        params = self.materialise()
        return torch.func.functional_call(self.skeleton, params, (tokens,))

    def step_flops(self, tokens: int, seq_len: int) -> float:
        """FLOPs of one operator step: the large model's forward+backward on ``tokens`` plus three
        times the materialisation (forward and the two backward products)."""
        from growth_ds.shapes import flops_per_token

        mat = 0.0
        schema = parameter_schema(self.shape)
        for kind in LAYER_KINDS:
            for n0 in [n for n in schema if n.startswith("layers.0.") and schema[n].module == kind]:
                if schema[n0].role == "weight":
                    (M, N), (P, Q) = self.skeleton.get_parameter(n0).shape, self.small[n0].shape
                    mat += self.L2 * (2 * self.L * P * Q + 2 * M * P * Q + 2 * M * Q * N)
        return flops_per_token(self.shape, seq_len) * tokens + 3 * mat


def materialise_state(op: LigoOperator, small: TrainingState, moments: str = "fresh") -> TrainingState:
    """The grown training state. ``moments``: ``fresh`` (LiGO: a new AdamW, step 0) or ``plan`` (the
    initialising plan's moment rule applied to the small model's moments, step kept). The LR schedule
    goes through the plan's LR policy, as :func:`growth_ds.ops.grow` does."""
    if moments not in ("fresh", "plan"):
        raise ValueError(f"moments: must be fresh or plan, got {moments!r}")
    with torch.no_grad():
        params = {n: t.detach().clone() for n, t in op.materialise().items()}
    schema = parameter_schema(op.shape)
    if moments == "fresh" or small.exp_avg is None:
        m = {n: torch.zeros_like(t) for n, t in params.items()}
        v = {n: torch.zeros_like(t) for n, t in params.items()}
        step = 0
    else:
        from growth_ds.ops.apply import source_name

        plan = op.plan
        m = {n: grow_moment(plan, n, s, small.exp_avg[source_name(plan, n)], 1) for n, s in schema.items()}
        v = {n: grow_moment(plan, n, s, small.exp_avg_sq[source_name(plan, n)], 2) for n, s in schema.items()}
        step = small.step
    schedule, schedule_step = op.plan.lr.apply(small.schedule, small.schedule_step)
    return TrainingState(op.shape, params, m, v, step, schedule, schedule_step, dict(small.extra))


__all__ = ["LigoOperator", "materialise_state"]  # the operator's training loop: growth_ds.train.ligo_fit
