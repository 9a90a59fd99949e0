"""Run megatron-core's GPTModel (local spec) on a CPU-only machine with gloo.

megatron-core's model code is device-agnostic except for a handful of sites that name CUDA
directly. This module replaces exactly those sites, and only when no CUDA device is present;
nothing here touches ``torch`` itself (torch functions are never reassigned).

Patched sites (megatron-core ``TESTED_VERSION``; line numbers of that release):

1. RNG tracker (``tensor_parallel/random.py:235``, forked on every attention forward at
   ``transformer/dot_product_attention.py:217``): a :class:`CpuRNGStatesTracker` with the same API
   and seed offsets that keeps CPU generator states.
2. RoPE (``models/common/embeddings/rotary_pos_embedding.py:160``): ``get_emb`` without the move of
   ``inv_freq`` to ``torch.cuda.current_device()``.
3. ``utils.GlobalMemoryBuffer.get_tensor`` (``utils.py:631``): scratch buffers allocated on the CPU.
4. The default causal / sliding-window masks (``transformer/utils.py:35``, also bound by name in
   ``fusions/fused_softmax.py``) built on the CPU instead of ``device="cuda"``.
5. Activation recompute (``tensor_parallel/random.py:447/457``): the saved "cuda" RNG state is the
   CPU generator's.
6. Tied embeddings under pipeline parallelism (``models/common/language_module/language_module.py:244``):
   the first and last stages' copies of the shared embedding are synchronised by an all-reduce of
   ``weight.data.cuda()``; the same all-reduce runs on the CPU tensor.

``dist_checkpointing.save`` additionally calls ``torch.cuda.synchronize()``
(``strategies/filesystem_async.py:230``) and ``torch.cuda.current_device()``
(``strategies/state_dict_saver.py:252``). Instead of stubbing those torch functions, the two
megatron modules get a module-level ``torch`` proxy whose ``cuda.synchronize`` is a no-op and whose
``cuda.current_device`` is the CPU; every other attribute is torch's own.

Patches 2-4 re-implement private megatron functions, so :func:`apply_cpu_patches` refuses any other
megatron-core version unless ``allow_untested_version=True``.

Known limits on the CPU (refused by megatron itself or by these patches): ``sequence_parallel``
(torch norms refuse it), ``num_query_groups % tensor_model_parallel_size != 0`` (its forward
all-gathers through ``torch.cuda.current_device()``), megatron's DDP / distributed optimizer.
Use a plain ``torch.optim.AdamW`` on the model's parameters.
"""
from __future__ import annotations

import contextlib
import operator
import types
from functools import reduce
from typing import Optional

import torch

TESTED_VERSION = "0.16.1"

_APPLIED: Optional[str] = None  # the megatron-core version the patches were applied to


def megatron_version() -> str:
    """The installed megatron-core version (``ImportError`` if it is not installed)."""
    import megatron.core

    return getattr(megatron.core, "__version__", "unknown")


def cpu_patches_needed() -> bool:
    """True when no CUDA device is available: the only situation the patches are for."""
    return not torch.cuda.is_available()


# ---- 1. RNG tracker -------------------------------------------------------------------------------
def _make_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's RNG tracker API over CPU generator states.

        ``add(name, seed)`` records a CPU generator state seeded with ``seed``; ``fork(name)`` swaps it
        into the default CPU generator (what dropout and init use for CPU tensors) and back.
        """

        def __init__(self):
            super().__init__(use_cudagraphable_rng=False, is_inference_rng_tracker=False)

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator(device="cpu").manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def model_parallel_cpu_manual_seed(seed: int):
    """CPU counterpart of ``tensor_parallel.model_parallel_cuda_manual_seed``.

    Seeds the default CPU generator with ``seed`` and installs a fresh CPU tracker holding
    megatron's three streams with megatron's offsets: data-parallel ``seed``, tensor-parallel
    ``seed + 2718 + tp_rank``, expert ``seed + 1024 + 100 * ep_rank + etp_rank``.
    Needs ``parallel_state.initialize_model_parallel`` to have run.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    tracker = _make_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + ps.get_tensor_model_parallel_rank())
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME,
                seed + 1024 + 100 * ps.get_expert_model_parallel_rank() + ps.get_expert_tensor_parallel_rank())
    return tracker


# ---- 2-5. CUDA-only sites in the forward ---------------------------------------------------------
def _patch_rope() -> None:
    from megatron.core.models.common.embeddings import rotary_pos_embedding as rpe

    def get_emb(self, max_seq_len: int, offset: int = 0):
        """``[max_seq_len, 1, 1, dim]`` angles, computed where ``inv_freq`` lives."""
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # (s, dim/2)
        if self.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).reshape(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]

    rpe.RotaryEmbedding.get_emb = get_emb
    clear = getattr(rpe.RotaryEmbedding.forward, "cache_clear", None)
    if clear is not None:
        clear()


def _patch_memory_buffer() -> None:
    from megatron.core import utils as mutils

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        """A view of a reusable CPU buffer of at least ``prod(tensor_shape)`` elements."""
        need = reduce(operator.mul, tensor_shape, 1)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < need:
            buf = self.buffer[(name, dtype)] = torch.empty(need, dtype=dtype, device="cpu")
        return buf[:need].view(*tensor_shape)

    mutils.GlobalMemoryBuffer.get_tensor = get_tensor


def _patch_masks() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        """``[sq, sq]`` bool, True above the diagonal (masked)."""
        return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)

    def get_sliding_window_causal_mask(sq, skv, window_size):
        """``[sq, skv]`` bool, True outside the window (masked)."""
        band = torch.ones(sq, skv, dtype=torch.bool).triu(diagonal=skv - sq - window_size[0])
        return ~band.tril(diagonal=skv - sq + window_size[1])

    for mod in (tutils, fused_softmax):
        mod.get_default_causal_mask = get_default_causal_mask
        mod.get_sliding_window_causal_mask = get_sliding_window_causal_mask


def _patch_recompute_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)


# ---- dist_checkpointing.save --------------------------------------------------------------------
class _CpuCuda(types.SimpleNamespace):
    """``torch.cuda`` as the checkpoint writer sees it on a CPU machine."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def current_device():
        return torch.device("cpu")


class _CpuTorch(types.ModuleType):
    """A module object that is ``torch`` except for ``.cuda`` (see :class:`_CpuCuda`)."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


def _patch_checkpoint_save() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async, state_dict_saver

    proxy = _CpuTorch()
    for mod in (filesystem_async, state_dict_saver):
        mod.torch = proxy


def _patch_tied_embedding_sync() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self) -> None:
        """megatron's own set-up with the stage-to-stage sync of a shared embedding done on the CPU tensor."""
        in_group, reached = self._is_in_embd_group, []

        def skip() -> bool:  # (shadows the method: the original skips its .cuda() sync, and says it got there)
            reached.append(True)
            return False

        self._is_in_embd_group = skip
        try:
            original(self)
        finally:
            del self._is_in_embd_group
        if reached and in_group():
            torch.distributed.all_reduce(self.shared_embedding_or_output_weight().data, group=self.embd_group)

    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def apply_cpu_patches(seed: Optional[int] = 1234, *, allow_untested_version: bool = False) -> bool:
    """Make megatron-core's local-spec GPTModel (forward, backward, dist_checkpointing) run on the CPU.

    Does nothing and returns False when CUDA is available. Otherwise applies the patches (once per
    process), then, when ``seed`` is not None and model parallelism is initialised, seeds megatron's
    RNG streams with :func:`model_parallel_cpu_manual_seed`. Returns True.

    Raises ``RuntimeError`` for a megatron-core version other than ``TESTED_VERSION`` unless
    ``allow_untested_version`` (the patched functions are private and change between releases).
    """
    global _APPLIED
    if not cpu_patches_needed():
        return False
    version = megatron_version()
    if version != TESTED_VERSION and not allow_untested_version:
        raise RuntimeError(f"growth_ds.interop.megatron_cpu patches private functions of megatron-core "
                           f"{TESTED_VERSION}; found {version}. Install megatron-core=={TESTED_VERSION} or pass "
                           f"allow_untested_version=True after checking the patched sites")
    if _APPLIED is None:
        _patch_rope()
        _patch_memory_buffer()
        _patch_masks()
        _patch_recompute_rng()
        _patch_checkpoint_save()
        _patch_tied_embedding_sync()
        _APPLIED = version
    if seed is not None:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            model_parallel_cpu_manual_seed(seed)
    return True


def patches_applied() -> bool:
    return _APPLIED is not None


__all__ = ["TESTED_VERSION", "apply_cpu_patches", "cpu_patches_needed", "megatron_version",
           "model_parallel_cpu_manual_seed", "patches_applied"]
