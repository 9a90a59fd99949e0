"""ModelShape's parameter counts (closed forms) against the parameter schema, and the layering of the
bottom packages: shapes imports no models; ops imports nothing above it."""
import dataclasses
import subprocess
import sys

import pytest

from growth_ds.models.schema import param_shape, parameter_schema
from growth_ds.shapes import ModelShape, flops_per_token

SHAPES = [
    ModelShape(),
    ModelShape(flavour="gpt2", n_layers=3, d_model=48, n_heads=6, n_kv_heads=6, head_dim=8, d_ffn=192,
               vocab_size=300, max_seq_len=40),
    ModelShape(flavour="gpt2", n_layers=2, d_model=64, n_heads=8, n_kv_heads=2, head_dim=8, d_ffn=96,
               vocab_size=512, max_seq_len=128, tied_embeddings=False),
    ModelShape(flavour="llama", n_layers=4, d_model=128, n_heads=8, n_kv_heads=4, head_dim=16, d_ffn=344,
               vocab_size=256, max_seq_len=64, tied_embeddings=False),
    ModelShape(flavour="llama", n_layers=1, d_model=24, n_heads=3, n_kv_heads=1, head_dim=10, d_ffn=50,
               vocab_size=97, max_seq_len=9),
]


def _count(shape, keep=lambda spec: True):
    total = 0
    for spec in parameter_schema(shape).values():
        if keep(spec):
            n = 1
            for s in param_shape(shape, spec):
                n *= s
            total += n
    return total


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.describe())
def test_param_counts_equal_the_schema(shape):
    assert shape.n_params == _count(shape)
    assert shape.n_nonembedding_params == _count(shape, lambda spec: spec.role not in ("embedding", "head"))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.describe())
def test_param_counts_equal_the_model(shape):
    from growth_ds.models import build_model

    assert shape.n_params == sum(p.numel() for p in build_model(shape, seed=0).parameters())


def test_flops_per_token_is_re_exported():
    from growth_ds.train import metrics

    assert metrics.flops_per_token is flops_per_token
    s = SHAPES[3]
    for tied in (True, False):  # the output layer is a matmul whether or not it shares the embedding
        t = dataclasses.replace(s, tied_embeddings=tied)
        assert flops_per_token(t, 16) == 6.0 * (t.n_nonembedding_params + s.vocab_size * s.d_model) \
            + 6.0 * s.n_layers * 16 * s.n_heads * s.head_dim


_LAYERS = """
import sys
import growth_ds.shapes
assert not [m for m in sys.modules if m.startswith("growth_ds.models")], "shapes imports models"
import growth_ds.models, growth_ds.ops, growth_ds.ops.ligo, growth_ds.ops.dense, growth_ds.ops.lr
above = [m for m in sys.modules if m.split(".")[0] in ("deepspeed", "megatron")
         or m.startswith(("growth_ds.train", "growth_ds.interop", "growth_ds.cli", "growth_ds.distributed"))]
assert not above, above
"""


def test_bottom_packages_import_nothing_above_them():
    proc = subprocess.run([sys.executable, "-c", _LAYERS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
