"""Triton kernels for the fused LiGO expansion ``W'_l = B_l (sum_j D[l, j] W_j) A_l^T``.

Imported lazily by :mod:`growth_ds.kernels.kron` (this module imports triton at the top).

Two kernels compute a batch of chained products in ONE launch::

    out_l[i, k] = sum_a X_l[i, a] * sum_b Y_l[a, b] * Z_l[k, b]        (out_l = X_l Y_l Z_l^T)

Every operand is addressed by three strides ``(layer, row, col)``, so transposes, row slices and shared
(layer stride 0) operands cost nothing. At most one operand is *depth mixed*: its tile is built on the fly
as ``sum_j D[l, j] * src[j]`` (``MIX`` names which one), so the mixed weight never exists in memory.
Accumulation is fp32. Masked loads handle shapes that are not multiples of the blocks.

* :func:`_slab_product_kernel` (the default): a persistent grid (two programs per SM); a work item is
  (layer, column tile, row split). Phase 1 writes the slab ``T = Y Z[k-tile]^T`` ([A, BLOCK_K], into a
  per-program scratch buffer, L2-resident), phase 2 computes the split's row tiles from it. With one split
  it executes exactly the FLOPs of einsum + two matmuls; splits (only when layers x column tiles would not
  fill the GPU) recompute the slab once each. Scratch is ``programs x A x BLOCK_K`` elements, independent of
  the number of layers; no ``[L2, P, Q]`` mix and no ``[L2, P, N]`` intermediate is ever allocated.
* :func:`_triple_product_kernel`: everything in registers over the grid ``(layers, cdiv(I, BLOCK_I),
  cdiv(K, BLOCK_K))``; the inner product is recomputed once per row tile (3-22x the two-matmul FLOPs for
  square growth d/2 -> d at d = 1k-8k, see :func:`forward_cost`). It remains for the layer-summed
  gradients of a shared ``B``/``A`` (in-kernel sum over layers, deterministic, no atomics).

:func:`launch_triple_product` picks the association (``X (Y Z^T)`` or, via the transpose, ``(X Y) Z^T``)
with fewer executed FLOPs when the operand roles allow it. This module states no timings: they are
what ``benchmarks/kron_kernel.py`` measures on the GPU it runs on.

Forward and backward passes (what is fused):

=========================  =======================================  ==============
quantity                   product                                  kernel
=========================  =======================================  ==============
``out = B_r Wmix A^T``     X=B_r,  Y=mix(W),  Z=A                   slab, MIX=Y
``dB_r = G A Wmix^T``      X=G,    Y=A,       Z=mix(W)              slab (tile if B shared), MIX=Z
``dA = G^T B_r Wmix``      X=G^T,  Y=B_r,     Z=mix(W)^T            slab (tile if A shared), MIX=Z
``dWmix = B_r^T G A``      X=B_r^T, Y=G,      Z=A^T                 slab, MIX=none
``dD, dW`` from ``dWmix``  two small torch GEMMs (fp32)             torch
=========================  =======================================  ==============

For a shared ``B`` or ``A`` (no layer axis) the layer sum of ``dB``/``dA`` runs inside the kernel
(grid layer axis 1, ``n_red = L2``), deterministic and without atomics.

Precision: fp32 inputs use ``input_precision="ieee"`` on GPU (exact fp32, no TF32). bf16/fp16
inputs feed the tensor cores; the fp32 intermediate ``t`` is rounded to the input dtype before
the second product (as in any bf16 GEMM chain) and the depth mix is summed in fp32 then rounded.
Under ``TRITON_INTERPRET=1`` every tile is upcast to fp32 right after ``tl.load`` (the
interpreter mis-handles bf16) and outputs are stored as fp32 and cast by torch (the interpreter
truncates fp32->bf16 instead of rounding).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Values of the MIX constexpr: which operand is depth mixed.
MIX_NONE, MIX_X, MIX_Y, MIX_Z = 0, 1, 2, 3


@triton.jit
def _load_tile(base, d_ptr, d_off, sd_j, n_src, s_src, rows, cols, n_rows, n_cols, s_row, s_col,
               MIXED: tl.constexpr, UPCAST: tl.constexpr):
    """Load a [len(rows), len(cols)] tile; if MIXED, sum_j D[d_off + j*sd_j] * base[j*s_src]."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows[:, None] * s_row + cols[None, :] * s_col
    if MIXED:
        coef = tl.load(d_ptr + d_off).to(tl.float32)
        tile = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) * coef
        src = base
        for j in range(1, n_src):
            src += s_src  # pointer steps: no int32 overflow of j * s_src
            coef = tl.load(d_ptr + d_off + j * sd_j).to(tl.float32)
            tile += tl.load(src + offs, mask=mask, other=0.0).to(tl.float32) * coef
        if not UPCAST:
            tile = tile.to(base.dtype.element_ty)
    else:
        tile = tl.load(base + offs, mask=mask, other=0.0)
        if UPCAST:
            tile = tile.to(tl.float32)
    return tile


@triton.jit
def _inner_tile(y_base, z_base, d_ptr, d_off, sd_j, n_src, sy_l, sz_l, rows_a, cols_k, n_a, n_b, n_k,
                sy_a, sy_b, sz_k, sz_b, MIX: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    """``Y[rows_a, :] Z[cols_k, :]^T`` -> [BLOCK_A, BLOCK_K] fp32 (a mixed Y or Z built on the fly)."""
    t = tl.zeros((BLOCK_A, BLOCK_K), dtype=tl.float32)
    for b0 in range(0, n_b, BLOCK_B):
        cols_b = b0 + tl.arange(0, BLOCK_B)
        y = _load_tile(y_base, d_ptr, d_off, sd_j, n_src, sy_l, rows_a, cols_b,
                       n_a, n_b, sy_a, sy_b, MIX == 2, UPCAST)
        # Z^T tile [BLOCK_B, BLOCK_K]: the transpose is just swapped strides.
        zt = _load_tile(z_base, d_ptr, d_off, sd_j, n_src, sz_l, cols_b, cols_k,
                        n_b, n_k, sz_b, sz_k, MIX == 3, UPCAST)
        t = tl.dot(y, zt, t, input_precision=PRECISION)
    return t


@triton.jit
def _triple_product_kernel(
    x_ptr, y_ptr, z_ptr, d_ptr, out_ptr,
    n_i, n_k, n_a, n_b, n_src, n_red,
    sx_l, sx_i, sx_a,
    sy_l, sy_a, sy_b,
    sz_l, sz_k, sz_b,
    sd_l, sd_j,
    so_l, so_i, so_k,
    MIX: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """out[l] = X[l] @ Y[l] @ Z[l]^T, fp32 accumulation; X: [I, A], Y: [A, B], Z: [K, B].

    Grid: (layers or 1, cdiv(I, BLOCK_I), cdiv(K, BLOCK_K)). Program (l, pi, pk) sums layers
    l .. l + n_red - 1 into its output tile (n_red = 1 except for the layer-reduced gradients).
    The mixed operand's layer stride is its *source* layer stride; its tile for target layer m is
    sum_j D[m, j] * src[j], j < n_src. Non-mixed operands use layer stride 0 when shared.
    """
    pid_l = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    cols_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
    for r in range(0, n_red):
        layer = pid_l + r
        d_off = layer * sd_l
        # Mixed operands start at source layer 0; the others at their own layer.
        x_base = x_ptr if MIX == 1 else x_ptr + layer * sx_l
        y_base = y_ptr if MIX == 2 else y_ptr + layer * sy_l
        z_base = z_ptr if MIX == 3 else z_ptr + layer * sz_l
        for a0 in range(0, n_a, BLOCK_A):
            rows_a = a0 + tl.arange(0, BLOCK_A)
            t = _inner_tile(y_base, z_base, d_ptr, d_off, sd_j, n_src, sy_l, sz_l, rows_a, cols_k, n_a, n_b, n_k,
                            sy_a, sy_b, sz_k, sz_b, MIX, UPCAST, PRECISION, BLOCK_A, BLOCK_K, BLOCK_B)
            x = _load_tile(x_base, d_ptr, d_off, sd_j, n_src, sx_l, rows_i, rows_a,
                           n_i, n_a, sx_i, sx_a, MIX == 1, UPCAST)
            acc = tl.dot(x, t.to(x.dtype), acc, input_precision=PRECISION)
    out = out_ptr + pid_l * so_l + rows_i[:, None] * so_i + cols_k[None, :] * so_k
    mask = (rows_i[:, None] < n_i) & (cols_k[None, :] < n_k)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _slab_product_kernel(
    x_ptr, y_ptr, z_ptr, d_ptr, out_ptr, scr_ptr,
    n_layers, n_i, n_k, n_a, n_b, n_src, n_split,
    sx_l, sx_i, sx_a,
    sy_l, sy_a, sy_b,
    sz_l, sz_k, sz_b,
    sd_l, sd_j,
    so_l, so_i, so_k,
    MIX: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """out[l] = X[l] @ (Y[l] @ Z[l]^T) without recomputing the inner product per row tile.

    Persistent: program p owns a scratch slab ``scr[p]`` of [n_a, BLOCK_K] and loops over work items
    (layer, column tile k, row split s). Phase 1 writes the slab ``T = Y Z[k-tile]^T`` (the mixed operand
    built on the fly, as in :func:`_triple_product_kernel`); phase 2 computes every row tile of split ``s``
    from it: ``out[i-tile, k-tile] = X[i-tile, :] T``. Executed FLOPs are ``n_split`` times the inner
    product plus the outer one (``n_split`` = 1: exactly the two-matmul count). X is never mixed; no
    layer reduction (:func:`_triple_product_kernel` does those).
    """
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    n_kt = tl.cdiv(n_k, BLOCK_K)
    n_it = tl.cdiv(n_i, BLOCK_I)
    per_split = tl.cdiv(n_it, n_split)
    n_items = n_layers * n_kt * n_split
    scr = scr_ptr + pid.to(tl.int64) * n_a * BLOCK_K
    cols = tl.arange(0, BLOCK_K)
    for item in range(pid, n_items, n_prog):
        layer = (item // (n_kt * n_split)).to(tl.int64)
        rem = item % (n_kt * n_split)
        pid_k = rem // n_split
        split = rem % n_split
        cols_k = pid_k * BLOCK_K + cols
        d_off = layer * sd_l
        x_base = x_ptr + layer * sx_l
        y_base = y_ptr if MIX == 2 else y_ptr + layer * sy_l
        z_base = z_ptr if MIX == 3 else z_ptr + layer * sz_l
        # phase 1: the slab T[:, k-tile] = Y Z[k-tile]^T, once per work item
        for a0 in range(0, n_a, BLOCK_A):
            rows_a = a0 + tl.arange(0, BLOCK_A)
            t = _inner_tile(y_base, z_base, d_ptr, d_off, sd_j, n_src, sy_l, sz_l, rows_a, cols_k, n_a, n_b, n_k,
                            sy_a, sy_b, sz_k, sz_b, MIX, UPCAST, PRECISION, BLOCK_A, BLOCK_K, BLOCK_B)
            tl.store(scr + rows_a[:, None] * BLOCK_K + cols[None, :], t.to(scr_ptr.dtype.element_ty),
                     mask=rows_a[:, None] < n_a)
        tl.debug_barrier()  # the slab is written by every thread of the program before any reads it
        # phase 2: this split's row tiles from the slab
        i_end = tl.minimum((split + 1) * per_split, n_it)
        for it in range(split * per_split, i_end):
            rows_i = it * BLOCK_I + tl.arange(0, BLOCK_I)
            acc = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
            for a0 in range(0, n_a, BLOCK_A):
                rows_a = a0 + tl.arange(0, BLOCK_A)
                x = _load_tile(x_base, d_ptr, d_off, sd_j, n_src, sx_l, rows_i, rows_a,
                               n_i, n_a, sx_i, sx_a, False, UPCAST)
                t = tl.load(scr + rows_a[:, None] * BLOCK_K + cols[None, :], mask=rows_a[:, None] < n_a,
                            other=0.0)
                if UPCAST:
                    t = t.to(tl.float32)
                acc = tl.dot(x, t, acc, input_precision=PRECISION)
            out = out_ptr + layer * so_l + rows_i[:, None] * so_i + cols_k[None, :] * so_k
            mask = (rows_i[:, None] < n_i) & (cols_k[None, :] < n_k)
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # every read of the slab is done before the next item overwrites it


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

def is_interpreter() -> bool:
    """True when the kernels above were defined under ``TRITON_INTERPRET=1`` (CPU interpreter)."""
    return not isinstance(_triple_product_kernel, triton.runtime.jit.JITFunction)


@dataclass(frozen=True, slots=True)
class Operand:
    """A batch of matrices as (tensor, layer stride, row stride, col stride).

    Layer stride 0 broadcasts one matrix to every layer. ``.t`` swaps row and column strides.
    """

    tensor: torch.Tensor
    s_layer: int
    s_row: int
    s_col: int
    n_rows: int
    n_cols: int

    @staticmethod
    def of(x: torch.Tensor) -> "Operand":
        """Wrap a [rows, cols] (shared) or [layers, rows, cols] tensor."""
        if x.dim() == 2:
            return Operand(x, 0, x.stride(0), x.stride(1), x.shape[0], x.shape[1])
        return Operand(x, x.stride(0), x.stride(1), x.stride(2), x.shape[1], x.shape[2])

    @property
    def t(self) -> "Operand":
        return Operand(self.tensor, self.s_layer, self.s_col, self.s_row, self.n_cols, self.n_rows)


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """Tile sizes and launch options of :func:`_triple_product_kernel` (all dims >= 16 on GPU)."""

    block_i: int
    block_k: int
    block_a: int
    block_b: int
    num_warps: int = 4
    num_stages: int = 2


def gpu_config(dtype: torch.dtype) -> KernelConfig:
    """Default sm_90 tiles: wgmma tiles for 16-bit inputs, smaller FMA tiles for fp32 ("ieee").

    Chosen without a GPU from ptxas -v on the AOT build: no register spills in any of the
    three specialisations (16-bit: 222-254 regs/thread at 8 warps; fp32: 96-148 at 4 warps).
    Not autotuned on hardware.
    """
    if dtype == torch.float32:
        return KernelConfig(64, 64, 32, 16, num_warps=4, num_stages=2)
    return KernelConfig(128, 128, 64, 32, num_warps=8, num_stages=3)


def _interp_block(n: int, cap: int = 128) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(int(n), 1))))


def interpreter_config(n_i: int, n_k: int, n_a: int, n_b: int) -> KernelConfig:
    """Interpreter tiles: as big as the problem (capped), because cost scales with #programs."""
    return KernelConfig(_interp_block(n_i), _interp_block(n_k), _interp_block(n_a),
                        _interp_block(n_b))


def executed_flops(n_i: int, n_k: int, n_a: int, n_b: int, block_i: int) -> int:
    """FLOPs the kernel executes per layer for out[I, K] = X[I, A] (Y[A, B] Z[K, B]^T)."""
    return 2 * triton.cdiv(n_i, block_i) * n_a * n_b * n_k + 2 * n_i * n_a * n_k


def forward_cost(r: int, p: int, q: int, n: int, l_src: int, config: KernelConfig, n_layers: int = 1,
                 programs: int = 264) -> dict:
    """Per-layer work of the fused forward for B_r [R, P], W [L1, P, Q], A [N, Q] -> [R, N].

    Returns ``useful`` (cheaper two-matmul association plus one depth mix, what torch does); for the tile
    kernel ``dot`` (tensor-core FLOPs executed: inner product recomputed per row tile) and ``mix``
    (CUDA-core depth-mix FLOPs, rebuilt for every output tile: 2 * L1 * P * Q * #tiles); for the slab
    kernel ``slab_dot``, ``slab_mix`` and its row ``split`` for ``n_layers`` layers on ``programs`` programs
    (264: two per SM of an H100). Mirrors the association choice of :func:`launch_triple_product`.
    """
    useful = min(2 * r * q * (p + n), 2 * p * n * (q + r)) + 2 * l_src * p * q
    dot = min(executed_flops(r, n, p, q, config.block_i),
              executed_flops(n, r, q, p, config.block_i))
    tiles = triton.cdiv(r, config.block_i) * triton.cdiv(n, config.block_k)
    # slab: X = B_r [R, P], Y = Wmix [P, Q], Z = A [N, Q]; or transposed X = A, Y = Wmix^T, Z = B_r
    split = _choose_split(n_layers, r, n, config, programs, p, q)
    split_t = _choose_split(n_layers, n, r, config, programs, q, p)
    slab, slab_t = slab_flops(r, n, p, q, split), slab_flops(n, r, q, p, split_t)
    k_tiles = triton.cdiv(n, config.block_k) * split if slab <= slab_t else triton.cdiv(r, config.block_k) * split_t
    return {"useful": useful, "dot": dot, "mix": 2 * l_src * p * q * tiles, "slab_dot": min(slab, slab_t),
            "slab_mix": 2 * l_src * p * q * k_tiles, "split": split if slab <= slab_t else split_t}


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def slab_flops(n_i: int, n_k: int, n_a: int, n_b: int, n_split: int) -> int:
    """FLOPs :func:`_slab_product_kernel` executes per layer for out[I, K] = X[I, A] (Y[A, B] Z[K, B]^T)."""
    return 2 * n_split * n_a * n_b * n_k + 2 * n_i * n_a * n_k


def _target_programs(device: torch.device, interp: bool) -> int:
    """Persistent grid size: two programs per SM on a GPU; a few under the interpreter (exercises the
    persistent loop; the interpreter's cost is per work item, not per program)."""
    if interp or device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _choose_split(n_layers: int, n_i: int, n_k: int, config: KernelConfig, target: int,
                  n_a: int = 1, n_b: int = 1) -> int:
    """Row splits per (layer, column tile): each split recomputes the slab but adds parallelism. Picks the
    power of two (at most one per row tile) that minimises executed FLOPs / GPU fill, with fill =
    min(1, work items / ``target`` programs)."""
    items, n_it = n_layers * triton.cdiv(n_k, config.block_k), triton.cdiv(n_i, config.block_i)
    if items == 0 or n_it == 0:
        return 1
    best, best_cost, split = 1, float("inf"), 1
    while split <= n_it:
        cost = slab_flops(n_i, n_k, n_a, n_b, split) / min(1.0, items * split / target)
        if cost < best_cost:
            best, best_cost = split, cost
        split *= 2
    return best


def launch_triple_product(x: Operand, y: Operand, z: Operand, out: Operand, *,
                          mix: int = MIX_NONE, d: torch.Tensor | None = None,
                          n_layers: int, reduce_layers: bool = False,
                          config: KernelConfig | None = None,
                          allow_transpose: bool = True, kernel: str = "auto",
                          n_split: int | None = None, programs: int | None = None) -> None:
    """out[l] = x[l] @ y[l] @ z[l]^T for l < n_layers, written in place into ``out``.

    Args:
        x, y, z: operands, shapes [I, A], [A, B], [K, B] per layer. The mixed one (``mix``)
            holds the *source* stack: its tile for layer l is sum_j d[l, j] * src[j].
        out: [I, K] per layer (fp32 under the interpreter, else any float dtype).
        d: [n_layers, L1] mixing matrix when ``mix != MIX_NONE``.
        reduce_layers: sum the n_layers products into one [I, K] output (``out.s_layer`` unused).
        config: tiles; default :func:`gpu_config` on GPU, :func:`interpreter_config` otherwise.
        allow_transpose: let the launcher compute out^T = z y^T x^T when that executes fewer
            FLOPs (only when x, z are not mixed, so the kernel specialisation is unchanged).
        kernel: ``slab`` (:func:`_slab_product_kernel`: the inner product once per column tile and row
            split, through a per-program scratch slab), ``tile`` (:func:`_triple_product_kernel`: all in
            registers, the inner product recomputed per row tile; also does layer reductions and a mixed
            ``x``) or ``auto`` (slab where it applies).
        n_split, programs: slab kernel overrides (row splits; persistent grid size).
    """
    n_i, n_a = x.n_rows, x.n_cols
    n_k, n_b = z.n_rows, z.n_cols
    if (y.n_rows, y.n_cols) != (n_a, n_b) or (out.n_rows, out.n_cols) != (n_i, n_k):
        raise ValueError(f"shape mismatch: x {n_i}x{n_a}, y {y.n_rows}x{y.n_cols}, "
                         f"z {n_k}x{n_b}, out {out.n_rows}x{out.n_cols}")
    if kernel not in ("auto", "slab", "tile"):
        raise ValueError(f"kernel must be auto, slab or tile, got {kernel!r}")
    slab = kernel == "slab" or (kernel == "auto" and not reduce_layers and mix != MIX_X)
    if slab and (reduce_layers or mix == MIX_X):
        raise ValueError("the slab kernel takes no layer reduction and no mixed x")
    interp = is_interpreter()
    default_config = config is None
    if default_config:
        dtype = x.tensor.dtype
        config = interpreter_config(n_i, n_k, n_a, n_b) if interp else gpu_config(dtype)
    target = programs or _target_programs(x.tensor.device, interp)
    if allow_transpose and mix in (MIX_NONE, MIX_Y):
        if slab:
            split = n_split or _choose_split(n_layers, n_i, n_k, config, target, n_a, n_b)
            split_t = n_split or _choose_split(n_layers, n_k, n_i, config, target, n_b, n_a)
            transpose = slab_flops(n_k, n_i, n_b, n_a, split_t) < slab_flops(n_i, n_k, n_a, n_b, split)
        else:
            transpose = executed_flops(n_k, n_i, n_b, n_a, config.block_i) < \
                executed_flops(n_i, n_k, n_a, n_b, config.block_i)
        if transpose:
            x, y, z, out = z, y.t, x, out.t
            n_i, n_k, n_a, n_b = n_k, n_i, n_b, n_a
            if interp and default_config:
                config = interpreter_config(n_i, n_k, n_a, n_b)
    if n_i == 0 or n_k == 0 or n_layers == 0:
        return  # empty output (e.g. an empty row range): nothing to launch
    if mix == MIX_NONE:
        d, n_src, sd_l, sd_j = x.tensor, 1, 0, 0  # d_ptr is never read
    else:
        if d is None:
            raise ValueError("a mixed operand needs the mixing matrix d")
        n_src, sd_l, sd_j = d.shape[1], d.stride(0), d.stride(1)
    precision = "ieee" if x.tensor.dtype == torch.float32 else "tf32"
    kwargs = {} if interp else dict(num_warps=config.num_warps, num_stages=config.num_stages)
    common = dict(MIX=mix, UPCAST=interp, PRECISION=precision, BLOCK_I=config.block_i, BLOCK_K=config.block_k,
                  BLOCK_A=config.block_a, BLOCK_B=config.block_b, **kwargs)
    strides = (x.s_layer, x.s_row, x.s_col, y.s_layer, y.s_row, y.s_col, z.s_layer, z.s_row, z.s_col,
               sd_l, sd_j, out.s_layer, out.s_row, out.s_col)
    if slab:
        split = n_split or _choose_split(n_layers, n_i, n_k, config, target, n_a, n_b)
        split = max(1, min(split, triton.cdiv(n_i, config.block_i)))
        n_items = n_layers * triton.cdiv(n_k, config.block_k) * split
        n_prog = max(1, min(n_items, target))
        scr_dtype = torch.float32 if interp or x.tensor.dtype == torch.float32 else x.tensor.dtype
        scratch = torch.empty((n_prog, n_a, config.block_k), dtype=scr_dtype, device=x.tensor.device)
        _slab_product_kernel[(n_prog,)](
            x.tensor, y.tensor, z.tensor, d, out.tensor, scratch,
            n_layers, n_i, n_k, n_a, n_b, n_src, split, *strides, **common)
        return
    grid = (1 if reduce_layers else n_layers, triton.cdiv(n_i, config.block_i),
            triton.cdiv(n_k, config.block_k))
    _triple_product_kernel[grid](
        x.tensor, y.tensor, z.tensor, d, out.tensor,
        n_i, n_k, n_a, n_b, n_src, n_layers if reduce_layers else 1, *strides, **common)


def _out_buffer(shape, like: torch.Tensor, zero: bool = False) -> torch.Tensor:
    """fp32 under the interpreter (its bf16 store truncates), else the input dtype."""
    dtype = torch.float32 if is_interpreter() else like.dtype
    make = torch.zeros if zero else torch.empty
    return make(shape, dtype=dtype, device=like.device)


def _check_launchable(D: torch.Tensor, *tensors: torch.Tensor) -> None:
    """One supported dtype for W, B, A (and G); one device for all; int32-addressable matrices."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
        raise TypeError(f"triton backend needs W, B, A (and the gradient) in one of {_DTYPES}, "
                        f"got {sorted(map(str, dtypes))}; use backend='torch' otherwise")
    on_cuda = tensors[0].is_cuda
    if not on_cuda and not is_interpreter():
        raise RuntimeError(
            "triton backend on CPU tensors needs the interpreter: set TRITON_INTERPRET=1 before "
            "growth_ds.kernels.kron_triton is first imported, or use backend='torch'")
    if not D.is_floating_point():
        raise TypeError(f"D must be a floating-point tensor, got {D.dtype}")
    for t in (D, *tensors):
        if t.device != tensors[0].device:
            raise ValueError(f"all operands must be on one device, got {t.device} and "
                             f"{tensors[0].device}")
        span = sum((n - 1) * abs(s) for n, s in zip(t.shape[-2:], t.stride()[-2:]))
        if span >= 2**31:
            raise ValueError(f"each matrix must span < 2**31 elements (int32 tile offsets), "
                             f"got shape {tuple(t.shape)} strides {t.stride()}")


def kron_forward(W, D, B, A, r0: int, r1: int, config: KernelConfig | None = None, kernel: str = "auto"):
    """out[l] = B_l[r0:r1] (sum_j D[l, j] W_j) A_l^T -> [L2, r1 - r0, N], fp32 accumulation.

    W: [L1, P, Q]; D: [L2, L1]; B: [L2, M, P] or [M, P]; A: [L2, N, Q] or [N, Q].
    Returns fp32 under the interpreter (cast by the caller), else W.dtype.
    """
    _check_launchable(D, W, B, A)
    n_layers = D.shape[0]
    b_rows = B[..., r0:r1, :]
    out = _out_buffer((n_layers, r1 - r0, A.shape[-2]), W)
    launch_triple_product(Operand.of(b_rows), Operand.of(W), Operand.of(A), Operand.of(out),
                          mix=MIX_Y, d=D, n_layers=n_layers, config=config, kernel=kernel)
    return out


def kron_backward(G, W, D, B, A, r0: int, r1: int, needs: tuple[bool, bool, bool, bool],
                  config: KernelConfig | None = None):
    """Gradients (dW, dD, dB, dA) of :func:`kron_forward` for output gradient G [L2, R, N].

    dB and dA keep B's / A's shape (summed over layers in-kernel when shared; rows outside
    [r0, r1) of dB are zero). dW and dD are fp32 torch GEMMs over the fused dWmix [L2, P, Q].
    Entries are None where ``needs`` (W, D, B, A) is False. Dtypes: fp32 under the
    interpreter, else the input dtype (dD: fp32).
    """
    _check_launchable(D, W, B, A, G)
    n_layers = D.shape[0]
    g = Operand.of(G)
    b_rows = Operand.of(B[..., r0:r1, :])
    need_w, need_d, need_b, need_a = needs
    dW = dD = dB = dA = None
    if need_b:  # dB_l[r0:r1] = G_l A_l Wmix_l^T  (X=G [R,N], Y=A [N,Q], Z=Wmix [P,Q])
        dB = _out_buffer(B.shape, B, zero=True)
        launch_triple_product(g, Operand.of(A), Operand.of(W), Operand.of(dB[..., r0:r1, :]),
                              mix=MIX_Z, d=D, n_layers=n_layers, reduce_layers=B.dim() == 2,
                              config=config)
    if need_a:  # dA_l = G_l^T B_l[r0:r1] Wmix_l  (X=G^T [N,R], Y=B_r [R,P], Z=Wmix^T [Q,P])
        dA = _out_buffer(A.shape, A, zero=A.dim() == 2)
        launch_triple_product(g.t, b_rows, Operand.of(W).t, Operand.of(dA),
                              mix=MIX_Z, d=D, n_layers=n_layers, reduce_layers=A.dim() == 2,
                              config=config)
    if need_w or need_d:  # dWmix_l = B_l[r0:r1]^T G_l A_l  (X=B_r^T, Y=G, Z=A^T)
        n_src, p, q = W.shape
        d_mix = torch.empty((n_layers, p, q), dtype=torch.float32, device=W.device)
        launch_triple_product(b_rows.t, g, Operand.of(A).t, Operand.of(d_mix),
                              n_layers=n_layers, config=config)
        flat = d_mix.reshape(n_layers, p * q)
        if need_d:  # dD[l, j] = <dWmix_l, W_j>
            dD = flat @ W.reshape(n_src, p * q).to(torch.float32).T
        if need_w:  # dW_j = sum_l D[l, j] dWmix_l
            dW = (D.to(torch.float32).T @ flat).reshape(n_src, p, q)
    return dW, dD, dB, dA


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): a CI gate that the kernels still build for sm_90.
# --------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

#: The kernel specialisations the forward/backward launch: name -> (kernel, MIX value). ``auto`` launches the
#: slab kernel everywhere except the layer-summed gradients of a shared B or A (tile kernel, MIX_Z).
AOT_VARIANTS = {"forward": ("tile", MIX_Y), "backward_mixed": ("tile", MIX_Z), "backward_plain": ("tile", MIX_NONE),
                "slab_forward": ("slab", MIX_Y), "slab_backward_mixed": ("slab", MIX_Z),
                "slab_backward_plain": ("slab", MIX_NONE)}


def aot_compile(variant: str, dtype: torch.dtype, arch: int = 90,
                config: KernelConfig | None = None):
    """Compile one kernel specialisation for ``cuda:sm_<arch>`` without a GPU.

    Must run in a process where TRITON_INTERPRET is unset (the kernel must be a JITFunction).
    Returns the ``triton.compiler.CompiledKernel`` (``.asm`` holds ttir/ttgir/llir/ptx/cubin).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if is_interpreter():
        raise RuntimeError("aot_compile needs TRITON_INTERPRET unset in this process")
    config = config or gpu_config(dtype)
    ty = _TRITON_DTYPE[dtype]
    which, mix = AOT_VARIANTS[variant]
    kernel = _slab_product_kernel if which == "slab" else _triple_product_kernel
    pointers = {"x_ptr": ty, "y_ptr": ty, "z_ptr": ty, "d_ptr": "fp32",
                "out_ptr": "fp32" if variant.endswith("backward_plain") else ty, "scr_ptr": ty}
    constexprs = {"MIX": mix, "UPCAST": False,
                  "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
                  "BLOCK_I": config.block_i, "BLOCK_K": config.block_k,
                  "BLOCK_A": config.block_a, "BLOCK_B": config.block_b}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "i32"
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


if __name__ == "__main__":  # pragma: no cover - used by tests/test_kernels.py in a subprocess
    import json
    import sys
    import time

    results = {}
    for spec in sys.argv[1:]:
        variant, dtype_name = spec.split(":")
        t0 = time.perf_counter()
        compiled = aot_compile(variant, getattr(torch, dtype_name))
        asm = compiled.asm
        results[spec] = {
            "seconds": time.perf_counter() - t0,
            "cubin_bytes": len(asm.get("cubin", b"")),
            "ptx_has_entry": (".entry _slab_product_kernel" if AOT_VARIANTS[variant][0] == "slab"
                              else ".entry _triple_product_kernel") in asm.get("ptx", ""),
            "ptx_target": next((ln.split()[1] for ln in asm.get("ptx", "").splitlines()
                                if ln.startswith(".target")), None),
            "shared_bytes": compiled.metadata.shared,
            "pid": os.getpid(),
        }
    print(json.dumps(results))
