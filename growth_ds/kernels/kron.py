"""LiGO Kronecker expansion of a stack of weights: torch reference, Triton dispatch, autograd.

For target layers l < L2 (LiGO, Wang et al. 2023, width map ``W -> B W A^T`` after depth mix)::

    W'_l = B_l (sum_j D[l, j] W_j) A_l^T

    W: [L1, P, Q]   stacked small-model weights of one kind ([out, in] each)
    D: [L2, L1]     depth mixing
    B: [L2, M, P] or [M, P] (shared by all layers)     out-dim expansion
    A: [L2, N, Q] or [N, Q] (shared by all layers)     in-dim expansion
    -> [L2, M, N]

``rows=(r0, r1)`` builds only ``W'[:, r0:r1, :]`` (a row-parallel fragment); it equals slicing
the full output, because row i of W'_l depends only on row i of B_l.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["kron_expand", "kron_expand_reference", "triton_available"]

_BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """Whether triton imports (the Triton backend is optional)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check(W: torch.Tensor, D: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
           rows: tuple[int, int] | None) -> tuple[int, int]:
    """Validate shapes; return the row range (r0, r1) in [0, M]."""
    if W.dim() != 3 or D.dim() != 2:
        raise ValueError(f"W must be [L1, P, Q] and D [L2, L1], got W {tuple(W.shape)}, "
                         f"D {tuple(D.shape)}")
    n_tgt, n_src = D.shape
    _, p, q = W.shape
    if W.shape[0] != n_src:
        raise ValueError(f"D is [L2, L1] = {tuple(D.shape)} but W has L1 = {W.shape[0]} layers")
    for name, x, inner in (("B", B, p), ("A", A, q)):
        if x.dim() not in (2, 3) or x.shape[-1] != inner or (x.dim() == 3
                                                              and x.shape[0] != n_tgt):
            raise ValueError(f"{name} must be [{n_tgt}, *, {inner}] or [*, {inner}] for "
                             f"W {tuple(W.shape)} and D {tuple(D.shape)}, got {tuple(x.shape)}")
    m = B.shape[-2]
    r0, r1 = (0, m) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= r0 <= r1 <= m:
        raise ValueError(f"rows must satisfy 0 <= r0 <= r1 <= M = {m}, got {rows}")
    return r0, r1


def kron_expand_reference(W: torch.Tensor, D: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                          rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Torch reference (source of truth): einsum depth mix + two matmuls.

    Shapes as in the module docstring; returns [L2, r1 - r0, N] in W.dtype. 16-bit inputs are
    computed in fp32 and rounded once at the end; fp32/fp64 stay in their dtype. Differentiable
    through ordinary autograd.
    """
    r0, r1 = _check(W, D, B, A, rows)
    acc = torch.float32 if W.dtype in (torch.bfloat16, torch.float16) else W.dtype
    w_mix = torch.einsum("lj,jpq->lpq", D.to(acc), W.to(acc))  # (L2, P, Q)
    b_rows = B.to(acc)[..., r0:r1, :]  # (L2 | -, R, P)
    a_t = A.to(acc).transpose(-1, -2)  # (L2 | -, Q, N)
    r, (p, q), n = r1 - r0, W.shape[1:], A.shape[-2]
    if r * q * (p + n) <= p * n * (q + r):  # fewer FLOPs: (B Wmix) A^T
        out = (b_rows @ w_mix) @ a_t
    else:  # B (Wmix A^T)
        out = b_rows @ (w_mix @ a_t)
    return out.to(W.dtype)  # (L2, R, N)


class _KronExpandTriton(torch.autograd.Function):
    """Triton forward and backward (see :mod:`growth_ds.kernels.kron_triton` for what is fused)."""

    @staticmethod
    def forward(ctx, W, D, B, A, r0, r1, config):
        from growth_ds.kernels import kron_triton

        ctx.save_for_backward(W, D, B, A)
        ctx.rows, ctx.config = (r0, r1), config
        return kron_triton.kron_forward(W, D, B, A, r0, r1, config).to(W.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        from growth_ds.kernels import kron_triton

        W, D, B, A = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        grads = kron_triton.kron_backward(grad_out.to(W.dtype), W, D, B, A, *ctx.rows, needs,
                                          ctx.config)
        grads = [None if g is None else g.to(x.dtype)
                 for g, x in zip(grads, (W, D, B, A))]
        return (*grads, None, None, None)


def kron_expand(W: torch.Tensor, D: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                rows: tuple[int, int] | None = None, *, backend: str = "auto",
                config=None) -> torch.Tensor:
    """``W'_l = B_l[r0:r1] (sum_j D[l, j] W_j) A_l^T`` -> [L2, r1 - r0, N], differentiable.

    Args:
        W: [L1, P, Q]; D: [L2, L1]; B: [L2, M, P] or [M, P]; A: [L2, N, Q] or [N, Q].
            W, B, A share one dtype (fp32, bf16 or fp16 for Triton); D may be fp32.
        rows: optional (r0, r1) with 0 <= r0 <= r1 <= M; equals ``kron_expand(...)[:, r0:r1]``.
        backend: "auto" (Triton for CUDA tensors when triton imports, torch otherwise),
            "triton" (forced; CPU tensors need TRITON_INTERPRET=1 set before the first import
            of :mod:`growth_ds.kernels.kron_triton`) or "torch" (:func:`kron_expand_reference`).
        config: optional ``kron_triton.KernelConfig`` tile override for the Triton backend.

    Returns:
        [L2, r1 - r0, N] in W.dtype; accumulation in fp32 for every backend.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if W.is_cuda and triton_available() else "torch"
    if backend == "torch":
        return kron_expand_reference(W, D, B, A, rows)
    r0, r1 = _check(W, D, B, A, rows)
    return _KronExpandTriton.apply(W, D, B, A, r0, r1, config)
