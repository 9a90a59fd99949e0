"""growth_ds.distributed.host_copy: the memmove path writes the same bytes as torch's copy, and only
takes tensors it can copy as flat bytes."""
import pytest
import torch

from growth_ds.distributed import host_copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_contiguous_copy_equals_torch_copy(dtype, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    n = 3 * host_copy.MIN_BYTES // 4 + 7  # above the threshold for both dtypes' byte counts
    src = torch.randn(n).to(dtype)
    src[5] = -0.0
    src[9] = float("nan")
    dst = torch.empty(n, dtype=dtype)
    ref = torch.empty(n, dtype=dtype).copy_(src)
    assert host_copy.copy_(dst, src) is dst
    assert torch.equal(dst.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       ref.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_falls_back_to_torch_for_what_is_not_a_flat_byte_copy(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    n = host_copy.MIN_BYTES
    src = torch.randn(2 * n)
    # a strided source, another dtype (a conversion), a broadcast: torch's semantics, not raw bytes
    cases = [(torch.empty(n), src[::2]), (torch.empty(n, dtype=torch.bfloat16), src[:n]),
             (torch.empty(4, n // 4), src[:n // 4])]
    for dst, s in cases:
        ref = torch.empty_like(dst).copy_(s)
        host_copy.copy_(dst, s)
        assert torch.equal(dst, ref)
