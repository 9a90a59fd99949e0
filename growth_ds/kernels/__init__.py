"""Fused Kronecker (LiGO) expansion: torch reference, Triton kernels, dispatch.

``kron_expand(W, D, B, A, rows=None)`` computes ``W'_l = B_l (sum_j D[l, j] W_j) A_l^T``.
Triton is imported lazily (only when the Triton backend runs), so this package imports without it.
"""
from growth_ds.kernels.kron import kron_expand, kron_expand_reference, triton_available

__all__ = ["kron_expand", "kron_expand_reference", "triton_available"]
