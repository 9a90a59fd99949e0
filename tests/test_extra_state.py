"""Transformer Engine ``_extra_state`` placement on a grown layer stack (pure: no checkpoint). The end-to-end
pass-through (saved by megatron-core, grown, loaded at another TP x PP) is in test_megatron_lm.py."""
import pytest

from growth_ds.interop.extra_state import regrid

FC1 = "decoder.layers.mlp.linear_fc1._extra_state"


def test_each_grown_layer_takes_its_source_layers_payload():
    states = {(FC1, (0,)): ("a", (2,)), (FC1, (1,)): ("b", (2,)), ("output_layer._extra_state", (0,)): ("o", (1,))}
    got = regrid(states, [0, 0, 1, 1], 2)  # e.g. stack-interleave: 0 0 1 1
    assert got == {(FC1, (0,)): ("a", (4,)), (FC1, (1,)): ("a", (4,)), (FC1, (2,)): ("b", (4,)),
                   (FC1, (3,)): ("b", (4,)), ("output_layer._extra_state", (0,)): ("o", (1,))}
    stacked = regrid(states, [0, 1, 0, 1], 2)  # the stack repeated
    assert [stacked[(FC1, (i,))][0] for i in range(4)] == ["a", "b", "a", "b"]


def test_more_axes_after_the_layer_axis_are_kept():
    key = "decoder.layers.mlp.experts.linear_fc1._extra_state"
    states = {(key, (l, e)): (f"{l}{e}", (2, 3)) for l in range(2) for e in range(3)}
    got = regrid(states, [1, 0, 1], 2)
    assert got[(key, (2, 2))] == ("12", (3, 3)) and got[(key, (1, 0))] == ("00", (3, 3)) and len(got) == 9


def test_refused_by_name():
    with pytest.raises(ValueError, match="linear_fc1._extra_state: its first axis has 3 entries, not the checkpoint's"):
        regrid({(FC1, (0,)): ("a", (3,))}, [0, 1], 2)
    with pytest.raises(ValueError, match=r"lacks the extra state at offsets \[\(1,\)\]"):  # layer 1's is missing
        regrid({(FC1, (0,)): ("a", (2,))}, [0, 1], 2)
