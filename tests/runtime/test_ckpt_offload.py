"""Checkpoint offload to host (issue 20 point 3, runtime/ckpt_offload.py) in process on a tiny HF Llama:
bitwise the losses and gradients of checkpointing without it, and what moves to the host is exactly the
checkpointed layers' inputs (one [batch, seq, hidden] tensor per checkpointed layer and micro-step),
under full, selective (every 2nd layer) and op-level checkpointing."""
from __future__ import annotations

import pytest
import torch

from savers_model import batch, build, step
from shardtrain.compiler.specs import GradCkpt
from shardtrain.runtime.ckpt_offload import HostStash, ckpt_stash, install_ckpt_offload


@pytest.mark.parametrize("ckpt", [GradCkpt.FULL, GradCkpt.OP])
def test_bitwise_equal_and_only_layer_inputs_move(ckpt):
    ref_loss, ref = step(build(ckpt=ckpt)[0])
    m, stash = build(ckpt=ckpt, ckpt_offload=True)
    assert ckpt_stash(m) is stash and not stash.pin_memory   # CPU: nothing to pin
    loss, got = step(m, batch(b=2, s=37))
    assert loss == ref_loss
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert stash.tensors == 2 and stash.shapes == [(2, 37, 64), (2, 37, 64)]
    assert stash.bytes == 2 * 2 * 37 * 64 * 4


def test_selective_moves_the_checkpointed_layer_only():
    from shardtrain.runtime.modeling import enable_checkpointing
    from savers_model import base_model
    import copy
    m = copy.deepcopy(base_model())
    m.train()
    stash = enable_checkpointing(m, GradCkpt.SELECTIVE, 2, ckpt_offload=True)
    step(m)
    assert stash.tensors == 1   # layer 0 of 2


def test_nothing_checkpointed_nothing_installed():
    from savers_model import base_model
    import copy
    assert install_ckpt_offload(copy.deepcopy(base_model()), "cpu") is None


def test_parameters_stay_put():
    """A parameter saved under the hooks (a weight, or its transposed view) is not copied."""
    stash = HostStash()
    w = torch.nn.Parameter(torch.ones(3, 3))
    x = torch.ones(2, 3, requires_grad=True)
    with stash.hooks():
        y = (x @ w.t()).sum()
    y.backward()
    assert stash.tensors == 1   # x only (mm saves x and w.t())
