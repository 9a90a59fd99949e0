"""Tests for growth_ds.kernels: torch reference, Triton kernels (CPU interpreter), sm_90 AOT build.

TRITON_INTERPRET must be set before the @triton.jit kernels are defined, i.e. before
growth_ds.kernels.kron_triton is first imported; hence the environment lines at the very top.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from growth_ds.kernels import kron_expand, kron_expand_reference, triton_available  # noqa: E402

HAS_TRITON = triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")

# Not multiples of any block size; M != N != P != Q so transposes are caught.
L1, L2, P, Q, M, N = 2, 3, 40, 24, 72, 56
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
LAYOUTS = {"per_layer": (False, False), "shared": (True, True), "shared_B": (True, False)}


def _inputs(dtype, shared_b, shared_a, *, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    W = rnd(L1, P, Q)
    D = torch.randn(L2, L1, generator=g, dtype=torch.float64).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    B = rnd(M, P) if shared_b else rnd(L2, M, P)
    A = rnd(N, Q) if shared_a else rnd(L2, N, Q)
    return W, D, B, A


def _rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _naive(W, D, B, A, rows=None):
    """Per-layer float64 loop: the definition, written as plainly as possible."""
    out = []
    for l in range(D.shape[0]):
        w_mix = sum(D[l, j].double() * W[j].double() for j in range(W.shape[0]))
        b = (B if B.dim() == 2 else B[l]).double()
        a = (A if A.dim() == 2 else A[l]).double()
        out.append(b @ w_mix @ a.T)
    out = torch.stack(out)
    return out if rows is None else out[:, rows[0]:rows[1]]


def _triton_skip_reason():
    if not HAS_TRITON:
        return "triton is not importable"
    from growth_ds.kernels import kron_triton

    if not kron_triton.is_interpreter():
        return "kron_triton was imported before TRITON_INTERPRET=1 was set"
    return None


_REASON = _triton_skip_reason()
triton_interp = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


# ---------------------------------------------------------------- reference ---

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [None, (5, 61), (0, 1), (72, 72)])
def test_reference_matches_definition(layout, rows):
    """einsum + matmuls == per-layer loop, shared B/A broadcast, rows == slice of full output."""
    W, D, B, A = _inputs(torch.float64, *LAYOUTS[layout])
    out = kron_expand_reference(W, D, B, A, rows)
    r = (0, M) if rows is None else rows
    assert out.shape == (L2, r[1] - r[0], N)
    torch.testing.assert_close(out, _naive(W, D, B, A, rows), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, kron_expand_reference(W, D, B, A)[:, r[0]:r[1]])


def test_reference_bf16_accumulates_in_fp32():
    """bf16 inputs: the reference rounds once at the end (error ~ 1 bf16 ulp of the output)."""
    W, D, B, A = _inputs(torch.bfloat16, False, False)
    out = kron_expand_reference(W, D, B, A)
    assert out.dtype == torch.bfloat16
    assert _rel_err(out, _naive(W, D, B, A)) < 4e-3


@pytest.mark.parametrize("layout", ["per_layer", "shared"])
def test_reference_gradcheck_float64(layout):
    """Reference gradients w.r.t. W, D, B, A (float64 gradcheck, with a row range)."""
    W, D, B, A = (x.detach().requires_grad_() for x in _inputs(torch.float64, *LAYOUTS[layout]))
    small = (W[:, :5, :4], D, B[..., :6, :5], A[..., :3, :4])
    small = tuple(x.detach().requires_grad_() for x in small)
    assert torch.autograd.gradcheck(lambda *t: kron_expand_reference(*t, rows=(1, 5)), small)


def test_shape_errors():
    """Bad shapes and row ranges raise ValueError naming the values."""
    W, D, B, A = _inputs(torch.float32, False, False)
    with pytest.raises(ValueError, match="L1"):
        kron_expand_reference(W[:1], D, B, A)
    with pytest.raises(ValueError, match="B must be"):
        kron_expand_reference(W, D, B[..., :-1], A)
    with pytest.raises(ValueError, match="A must be"):
        kron_expand_reference(W, D, B, A[:2])
    with pytest.raises(ValueError, match="rows"):
        kron_expand_reference(W, D, B, A, rows=(10, 5))
    with pytest.raises(ValueError, match="backend"):
        kron_expand(W, D, B, A, backend="cuda")


def test_auto_backend_on_cpu_is_reference():
    """backend='auto' on CPU tensors is the torch reference (bitwise)."""
    W, D, B, A = _inputs(torch.float32, True, False)
    assert torch.equal(kron_expand(W, D, B, A, (3, 9)), kron_expand_reference(W, D, B, A, (3, 9)))


def test_package_imports_without_triton():
    """growth_ds.kernels imports and runs the reference when triton is missing."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, growth_ds.kernels as k\n"
            "assert not k.triton_available()\n"
            "x = k.kron_expand(torch.ones(1, 2, 2), torch.ones(1, 1), torch.ones(3, 2),"
            " torch.ones(2, 2))\n"
            "assert x.shape == (1, 3, 2) and 'growth_ds.kernels.kron_triton' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------ triton (interpreter) ---

def _grads(fn, inputs, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    (out.float() * grad_out.float()).sum().backward()
    return out, [x.grad for x in leaves]


@triton_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [None, (5, 61)], ids=["full", "rows"])
def test_triton_forward_backward_match_reference(dtype, layout, rows):
    """Triton forward and all four gradients == reference (fp32 1e-5, bf16 1e-2 relative)."""
    inputs = _inputs(dtype, *LAYOUTS[layout])
    r = (0, M) if rows is None else rows
    grad_out = torch.randn(L2, r[1] - r[0], N, generator=torch.Generator().manual_seed(1))
    out, grads = _grads(lambda *t: kron_expand(*t, rows=rows, backend="triton"), inputs,
                        grad_out.to(dtype))
    ref, ref_grads = _grads(lambda *t: kron_expand_reference(*t, rows=rows), inputs,
                            grad_out.to(dtype))
    assert out.dtype == dtype and out.shape == ref.shape
    assert _rel_err(out, ref) < TOL[dtype]
    for name, g, g_ref, x in zip("WDBA", grads, ref_grads, inputs):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert _rel_err(g, g_ref) < TOL[dtype], name
    if rows is not None:  # dB outside the fragment's rows is exactly zero
        assert not grads[2][..., :r[0], :].any() and not grads[2][..., r[1]:, :].any()


@triton_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_rows_equal_full_output_rows(dtype):
    """A row fragment equals the matching rows of the full Triton output."""
    W, D, B, A = _inputs(dtype, False, True)
    full = kron_expand(W, D, B, A, backend="triton")
    for r0, r1 in [(0, 7), (7, 72), (33, 34), (40, 40)]:
        part = kron_expand(W, D, B, A, rows=(r0, r1), backend="triton")
        assert part.shape == (L2, r1 - r0, N)
        if r1 > r0:
            assert _rel_err(part, full[:, r0:r1]) < TOL[dtype] / 10


@triton_interp
def test_triton_multi_tile_ragged_blocks():
    """Several ragged tiles along every loop (I, K, A, B) plus the in-kernel layer sum."""
    from growth_ds.kernels.kron_triton import KernelConfig

    config = KernelConfig(64, 32, 32, 16)  # 72 -> 2 tiles, 56 -> 2, 40 -> 2, 24 -> 2
    inputs = _inputs(torch.float32, True, False)
    grad_out = torch.randn(L2, M, N, generator=torch.Generator().manual_seed(2))
    out, grads = _grads(lambda *t: kron_expand(*t, backend="triton", config=config), inputs,
                        grad_out)
    ref, ref_grads = _grads(kron_expand_reference, inputs, grad_out)
    assert _rel_err(out, ref) < 1e-5
    for name, g, g_ref in zip("WDBA", grads, ref_grads):
        assert _rel_err(g, g_ref) < 1e-5, name


@triton_interp
def test_triton_both_associations():
    """X (Y Z^T) and its transpose (X Y) Z^T give the same product."""
    from growth_ds.kernels import kron_triton as kt

    W, D, B, A = _inputs(torch.float32, False, False)
    ref = kron_expand_reference(W, D, B, A)
    for allow in (False, True):
        out = torch.empty(L2, M, N)
        kt.launch_triple_product(kt.Operand.of(B), kt.Operand.of(W), kt.Operand.of(A),
                                 kt.Operand.of(out), mix=kt.MIX_Y, d=D, n_layers=L2,
                                 allow_transpose=allow)
        assert _rel_err(out, ref) < 1e-5


@triton_interp
@pytest.mark.parametrize("dtype,n_split,programs", [(torch.float32, 1, 1), (torch.bfloat16, 2, 3),
                                                    (torch.float32, 3, 64)])
def test_slab_kernel_splits_and_persistent_programs(dtype, n_split, programs):
    """The slab kernel (inner product once per column tile and row split, via a per-program scratch slab)
    equals the tile kernel and the reference with several column tiles, row splits, and fewer programs
    than work items (each program reuses its slab), for the mixed-Y forward and a mixed-Z product."""
    from growth_ds.kernels import kron_triton as kt

    config = kt.KernelConfig(16, 16, 16, 16)  # 72 rows -> 5 row tiles, 56 cols -> 4 column tiles
    W, D, B, A = _inputs(dtype, False, True, seed=3)
    ref = _naive(W, D, B, A)
    outs = {}
    for kernel in ("slab", "tile"):
        out = torch.zeros(L2, M, N)
        kt.launch_triple_product(kt.Operand.of(B), kt.Operand.of(W), kt.Operand.of(A), kt.Operand.of(out),
                                 mix=kt.MIX_Y, d=D, n_layers=L2, config=config, allow_transpose=False,
                                 kernel=kernel, n_split=n_split if kernel == "slab" else None,
                                 programs=programs if kernel == "slab" else None)
        outs[kernel] = out
        assert _rel_err(out, ref) < TOL[dtype], kernel
    assert _rel_err(outs["slab"], outs["tile"]) < TOL[dtype]
    # mixed Z (the dB product): G [M, N] (A [N, Q] Wmix [P, Q]^T) -> [M, P]
    G = torch.randn(L2, M, N, generator=torch.Generator().manual_seed(4)).to(dtype)
    out = torch.zeros(L2, M, P)
    kt.launch_triple_product(kt.Operand.of(G), kt.Operand.of(A), kt.Operand.of(W), kt.Operand.of(out),
                             mix=kt.MIX_Z, d=D, n_layers=L2, config=config, kernel="slab", n_split=n_split,
                             programs=programs)
    w_mix = torch.einsum("lj,jpq->lpq", D.double(), W.double())
    want = G.double() @ (A.double() @ w_mix.transpose(1, 2))
    assert _rel_err(out, want) < TOL[dtype]


def test_slab_kernel_executes_the_two_matmul_flops():
    """Cost model: one split executes exactly the cheaper two-matmul FLOPs; the tile kernel recomputes the
    inner product per row tile (why the slab kernel is the default)."""
    from growth_ds.kernels.kron_triton import executed_flops, slab_flops

    d = 4096
    n_i, n_k, n_a, n_b = d, d, d // 2, d // 2
    two_matmuls = 2 * n_a * n_b * n_k + 2 * n_i * n_a * n_k
    assert slab_flops(n_i, n_k, n_a, n_b, 1) == two_matmuls
    assert executed_flops(n_i, n_k, n_a, n_b, 128) > 10 * two_matmuls


@triton_interp
def test_triton_rejects_unsupported_dtype():
    """float64 is reference-only: the Triton backend raises TypeError."""
    W, D, B, A = _inputs(torch.float64, False, False)
    with pytest.raises(TypeError, match="backend='torch'"):
        kron_expand(W, D, B, A, backend="triton")


# ------------------------------------------------------- sm_90 AOT compile ---

AOT_SPECS = [f"{v}:{dt}" for v in ("forward", "backward_mixed", "backward_plain", "slab_forward",
                                   "slab_backward_mixed", "slab_backward_plain")
             for dt in ("float32", "bfloat16")]


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    """Compile every kernel specialisation for sm_90 once, in a process without the interpreter.

    A fresh TRITON_CACHE_DIR makes the build real on every run (about 10-15 s on 2 cores).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    proc = subprocess.run([sys.executable, "-m", "growth_ds.kernels.kron_triton", *AOT_SPECS],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("spec", AOT_SPECS)
def test_aot_compile_sm90(aot_results, spec):
    """Each forward/backward kernel (fp32 and bf16) builds a cubin + PTX for sm_90."""
    res = aot_results[spec]
    assert res["cubin_bytes"] > 0
    assert res["ptx_has_entry"]
    assert res["ptx_target"].startswith("sm_90")
    assert res["shared_bytes"] <= 227 * 1024  # H100 per-block shared-memory limit
