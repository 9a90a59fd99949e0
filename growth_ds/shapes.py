"""Model shapes and the rules for growing one shape into another.

A :class:`ModelShape` fully describes a reference decoder (see :mod:`growth_ds.models`):
two flavours share one parameter layout.

* ``gpt2``  -- LayerNorm, GELU MLP, learned positions, biases everywhere.
* ``llama`` -- RMSNorm, SwiGLU MLP, RoPE, no biases, grouped-query attention.

Spaces (named axes that growth acts on) derive from a shape:
``model = d_model``, ``ffn = d_ffn``, ``heads = n_heads * head_dim``, ``kv = n_kv_heads * head_dim``,
``vocab = vocab_size``, ``pos = max_seq_len``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

FLAVOURS = ("gpt2", "llama")
#: the fields that fix a model's architecture (``norm_eps`` may be rescaled by growth, ``rope_theta`` is a setting)
ARCH_FIELDS = ("flavour", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ffn", "vocab_size",
               "max_seq_len", "tied_embeddings")


@dataclass(frozen=True)
class ModelShape:
    """Architecture of a reference decoder.

    Invariants (checked in ``__post_init__``): all sizes positive, ``n_kv_heads`` divides
    ``n_heads``; ``head_dim`` even under RoPE.
    """

    flavour: str = "llama"
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 16
    d_ffn: int = 256
    vocab_size: int = 256
    max_seq_len: int = 64
    tied_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {FLAVOURS}, got {self.flavour!r}")
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ffn",
                     "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.flavour == "llama" and self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")

    # ---- derived sizes ---------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def space_dim(self, space: str) -> int:
        """Size of a named space (``model``, ``ffn``, ``heads``, ``kv``, ``vocab``, ``pos``)."""
        return {
            "model": self.d_model, "ffn": self.d_ffn, "heads": self.n_heads * self.head_dim,
            "kv": self.n_kv_heads * self.head_dim, "vocab": self.vocab_size, "pos": self.max_seq_len,
        }[space]

    def _layer_params(self) -> int:
        """Parameters of one decoder layer (the ``layers.{i}.*`` rows of ``models.schema``)."""
        d, f = self.d_model, self.d_ffn
        heads, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        n = 2 * d + heads * d + 2 * kv * d + d * heads  # attn_norm, mlp_norm gains; q, k, v, o weights
        if self.flavour == "gpt2":  # norm biases, q/k/v/o biases, up + down (with biases)
            return n + 2 * d + heads + 2 * kv + d + 2 * f * d + f + d
        return n + 3 * f * d  # llama: gate, up, down

    @property
    def n_params(self) -> int:
        """Total parameter count (embeddings included, tied head counted once).

        Closed form of ``growth_ds.models.schema.parameter_schema`` (tests check the two agree)."""
        emb = self.vocab_size * self.d_model + (self.max_seq_len * self.d_model if self.flavour == "gpt2" else 0)
        head = 0 if self.tied_embeddings else self.vocab_size * self.d_model
        return emb + self.n_nonembedding_params + head

    @property
    def n_nonembedding_params(self) -> int:
        """Parameters outside the token/position embeddings and the output head (Kaplan's N)."""
        final_norm = self.d_model * (2 if self.flavour == "gpt2" else 1)
        return self.n_layers * self._layer_params() + final_norm

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelShape":
        """Build from a mapping; unknown keys are an error naming them."""
        data = dict(data)
        if "model" in data and isinstance(data["model"], Mapping):  # accept {"model": {...}}
            data = dict(data["model"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelShape field(s) {unknown}; known fields: {sorted(known)}")
        if "n_kv_heads" not in data and "n_heads" in data:
            data["n_kv_heads"] = data["n_heads"]
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelShape":
        import yaml

        with open(path) as f:
            data = yaml.safe_load(f)
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a mapping of ModelShape fields")
        return cls.from_dict(data)

    def arch_mismatch(self, other: "ModelShape") -> Optional[str]:
        """``"field: a vs b"`` for the first architecture field that differs, else None."""
        for f in ARCH_FIELDS:
            if getattr(self, f) != getattr(other, f):
                return f"{f}: {getattr(self, f)!r} vs {getattr(other, f)!r}"
        return None

    def describe(self) -> str:
        return (f"{self.flavour} L={self.n_layers} d={self.d_model} heads={self.n_heads}/{self.n_kv_heads}"
                f"x{self.head_dim} ffn={self.d_ffn} V={self.vocab_size} ({self.n_params / 1e6:.2f}M params)")


def validate_growth(small: ModelShape, large: ModelShape) -> None:
    """Raise ``ValueError`` naming the field if ``small`` cannot be grown into ``large``.

    Refused: a flavour or embedding-tying change, any dimension that shrinks, a vocabulary
    change (the tokenizer fixes it), a ``head_dim`` change (RoPE fixes it for llama; for gpt2
    growth adds heads instead, as LEMON and HyperCloning do), and query-head counts that cannot
    be laid out over the KV groups.
    """
    if small.flavour != large.flavour:
        raise ValueError(f"flavour: cannot grow {small.flavour!r} into {large.flavour!r}")
    if small.tied_embeddings != large.tied_embeddings:
        raise ValueError(f"tied_embeddings: cannot change from {small.tied_embeddings} to {large.tied_embeddings}")
    for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ffn", "max_seq_len"):
        a, b = getattr(small, name), getattr(large, name)
        if b < a:
            raise ValueError(f"{name}: growth cannot shrink {a} -> {b}")
    if small.vocab_size != large.vocab_size:
        raise ValueError(f"vocab_size: must stay {small.vocab_size} (the tokenizer fixes it), got {large.vocab_size}")
    if small.head_dim != large.head_dim:
        why = "RoPE fixes head_dim" if small.flavour == "llama" else "growth adds heads, not head_dim"
        raise ValueError(f"head_dim: cannot change {small.head_dim} -> {large.head_dim} ({why})")
    if small.flavour == "llama" and small.rope_theta != large.rope_theta:
        raise ValueError(f"rope_theta: cannot change {small.rope_theta} -> {large.rope_theta} (positions would "
                         f"rotate differently); set the target's rope_theta to the source's")
    if large.n_heads % large.n_kv_heads:
        raise ValueError(f"n_heads: {large.n_heads} query heads do not divide into {large.n_kv_heads} kv groups")


def flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Training FLOPs per token: ``6 N + 6 L T d_attn``.

    ``N`` counts every matmul weight, the output layer included (tied or not), and excludes the
    embedding lookups; the attention term is the causal score and value products (Kaplan et al.
    2020, halved for causality), forward + backward.
    """
    matmul_params = shape.n_nonembedding_params + shape.vocab_size * shape.d_model  # + the output layer
    d_attn = shape.n_heads * shape.head_dim
    return 6.0 * matmul_params + 6.0 * shape.n_layers * seq_len * d_attn
