"""Worker for tests/test_megatron_lm.py: megatron-core GPTModels at any (TP, PP) on gloo processes.

    torchrun --nproc_per_node TP*PP tests/pp_worker.py DIR PHASE TP PP

For each flavour (gpt2 tied, llama GQA untied):

* ``save``: every rank builds its pipeline stage of the small model (megatron-core's own ``GPTModel`` with
  ``pre_process`` / ``post_process``), gives its AdamW random moments and step 5, and all ranks save one
  Megatron-LM run (``DIR/FLAVOUR_run/iter_0000005`` + tracker) with megatron-core's ``dist_checkpointing.save``.
  The linear modules carry a Transformer Engine-style ``_extra_state`` (:func:`te_like`), which megatron-core's
  own ``sharded_state_dict`` saves as one ``ShardedObject`` per module on the global layer axis, as it does for
  a TE-spec run.
* ``check``: every rank builds its stage of the grown model (TE-style modules too), loads ``DIR/FLAVOUR_grown/iter_0000005`` with
  megatron-core's loader, runs the pipeline forward (stage outputs sent rank to rank) and writes, from the last
  stage, the full logits (``DIR/FLAVOUR_tpT_ppP_logits.pt``); the first TP rank of every stage writes the
  global indices of its layers and the ``_extra_state`` each module loaded (``DIR/FLAVOUR_tpT_ppP_stageS.json``).
Top-level imports stay light: dist_checkpointing's writer may spawn a process that re-imports this file.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def shapes(flavour):
    from growth_ds.shapes import ModelShape

    if flavour == "gpt2":
        small = ModelShape(flavour="gpt2", n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, d_ffn=64,
                           vocab_size=96, max_seq_len=32)
        large = ModelShape(flavour="gpt2", n_layers=4, d_model=48, n_heads=6, n_kv_heads=6, head_dim=8, d_ffn=96,
                           vocab_size=96, max_seq_len=32)
    else:
        small = ModelShape(flavour="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ffn=64,
                           vocab_size=96, max_seq_len=32, tied_embeddings=False)
        large = ModelShape(flavour="llama", n_layers=4, d_model=64, n_heads=8, n_kv_heads=4, head_dim=8, d_ffn=128,
                           vocab_size=96, max_seq_len=32, tied_embeddings=False)
    return small, large


def tokens():
    import torch

    return torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))


def megatron_lm_args(shape, tp, pp, **extra):
    import argparse

    llama = shape.flavour == "llama"
    return argparse.Namespace(
        num_layers=shape.n_layers, hidden_size=shape.d_model, num_attention_heads=shape.n_heads,
        group_query_attention=shape.n_kv_heads != shape.n_heads, num_query_groups=shape.n_kv_heads,
        kv_channels=shape.head_dim, ffn_hidden_size=shape.d_ffn, max_position_embeddings=shape.max_seq_len,
        seq_length=shape.max_seq_len, normalization="RMSNorm" if llama else "LayerNorm", swiglu=llama,
        position_embedding_type="rope" if llama else "learned_absolute", add_bias_linear=not llama,
        untie_embeddings_and_output_weights=not shape.tied_embeddings, norm_epsilon=shape.norm_eps,
        rotary_base=int(shape.rope_theta), tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        padded_vocab_size=shape.vocab_size, **{"lr": 3e-4, "train_iters": 1000, **extra})


TE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def te_like(model):
    """Give each decoder layer's linear modules Transformer Engine's ``get_extra_state`` / ``set_extra_state``
    (TE cannot be installed here): the saved payload, a uint8 tensor as TE returns, names the module's global
    layer and name; what a load sets is kept as ``module.loaded_extra_state``."""
    import torch

    def get_extra_state(self):
        return torch.tensor(list(f"{self.te_tag[0]}:{self.te_tag[1]}".encode()), dtype=torch.uint8)

    def set_extra_state(self, state):
        self.loaded_extra_state = bytes(state.tolist()).decode()

    for layer in model.decoder.layers:
        for name in TE_MODULES:
            mod = layer.get_submodule(name)
            mod.__class__ = type(f"TE{type(mod).__name__}", (type(mod),),
                                 {"get_extra_state": get_extra_state, "set_extra_state": set_extra_state})
            mod.te_tag = (layer.layer_number - 1, name)  # megatron numbers layers globally, from 1
    return model


def stage_model(shape, tp, pp):
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from growth_ds.interop import megatron as gm

    config = gm.transformer_config(shape, tp=tp, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32)
    model = GPTModel(config, gm.layer_spec(config), vocab_size=shape.vocab_size,
                     max_sequence_length=shape.max_seq_len, share_embeddings_and_output_weights=shape.tied_embeddings,
                     position_embedding_type="learned_absolute" if shape.flavour == "gpt2" else "rope",
                     rotary_base=shape.rope_theta, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage())
    gm.ensure_tp_attributes(model, shape)
    return model


def pipeline_logits(model, x, tp):
    """Full logits on the last stage (None elsewhere): each stage sends its output to the next rank in the
    pipeline group."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from growth_ds.interop import megatron as gm

    pos = torch.arange(x.shape[1]).unsqueeze(0).expand_as(x)
    grp = ps.get_pipeline_model_parallel_group()
    ranks = dist.get_process_group_ranks(grp)
    me = ps.get_pipeline_model_parallel_rank()
    if not ps.is_pipeline_first_stage():
        h = torch.empty(x.shape[1], x.shape[0], model.config.hidden_size)
        dist.recv(h, src=ranks[me - 1])
        model.set_input_tensor(h)
    with torch.no_grad():
        out = model(x, pos, None)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ranks[me + 1])
        return None
    group = ps.get_tensor_model_parallel_group()
    return gm.gather_tensor(out, gm.ShardSpec(2, 1, ps.get_tensor_model_parallel_rank(), tp), group)


def save(out, flavour, small, tp, pp, rank):
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    model = te_like(stage_model(small, tp, pp))
    opt = torch.optim.AdamW(model.parameters())
    g = torch.Generator().manual_seed(100 + rank)
    for p in model.parameters():  # Adam state as after 5 steps (moments of the right sign and scale)
        opt.state[p] = {"step": torch.tensor(5.0), "exp_avg": torch.randn(p.shape, generator=g) * 1e-3,
                        "exp_avg_sq": torch.rand(p.shape, generator=g) * 1e-6}
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)

    sd = {"model": model.sharded_state_dict()}
    osd = opt.state_dict()
    optim_state_to_sharding_state(osd, get_param_id_to_sharded_param_map(sd["model"], list(model.parameters())),
                                  exclude_keys=("step",))
    sd["optimizer"] = osd
    sd.update(args=megatron_lm_args(small, tp, pp), iteration=5, checkpoint_version=3.0,
              opt_param_scheduler={"num_steps": 80}, num_floating_point_operations_so_far=2.0e9)
    root = os.path.join(out, f"{flavour}_run")
    d = os.path.join(root, "iter_0000005")
    if rank == 0:
        os.makedirs(d, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(sd, d)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("5")


def check(out, flavour, small, large, tp, pp):
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from growth_ds.ops import make_plan

    grown = make_plan(small, large, width="zero", depth="identity", seed=0).grown_shape
    model = te_like(stage_model(grown, tp, pp))
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                     os.path.join(out, f"{flavour}_grown", "iter_0000005"))
    model.load_state_dict(loaded["model"], strict=True)
    logits = pipeline_logits(model, tokens(), tp)
    tag = f"{flavour}_tp{tp}_pp{pp}"
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
        torch.save(logits, os.path.join(out, f"{tag}_logits.pt"))
    offset = model.decoder.layers[0].layer_number - 1  # megatron numbers a stage's layers from its offset
    if ps.get_tensor_model_parallel_rank() == 0:
        with open(os.path.join(out, f"{tag}_stage{ps.get_pipeline_model_parallel_rank()}.json"), "w") as f:
            json.dump({"layers": [offset + i for i in range(len(model.decoder.layers))],
                       "extra_state": {offset + i: {n: layer.get_submodule(n).loaded_extra_state for n in TE_MODULES}
                                       for i, layer in enumerate(model.decoder.layers)}}, f)


def main():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from growth_ds.interop.megatron_cpu import apply_cpu_patches

    out, phase, tp, pp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    apply_cpu_patches(1234)
    rank = dist.get_rank()
    for flavour in ("gpt2", "llama"):
        small, large = shapes(flavour)
        if phase == "save":
            save(out, flavour, small, tp, pp, rank)
        else:
            check(out, flavour, small, large, tp, pp)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
