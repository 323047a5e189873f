"""Gradient checkpointing (non-reentrant; full = every layer, selective = every k-th) gives the same
loss as no checkpointing, under DDP and FSDP2."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.multiproc


def test_layers_checkpointed(torch_results):
    assert torch_results["ddp_ckpt_full"]["probe"]["checkpointed"] == [0, 1]
    assert torch_results["ddp_ckpt_selective"]["probe"]["checkpointed"] == [0]
    assert torch_results["fsdp_ckpt_full"]["probe"]["checkpointed"] == [0, 1]


@pytest.mark.parametrize("name", ["ddp_ckpt_full", "ddp_ckpt_selective", "fsdp_ckpt_full"])
def test_same_loss(torch_results, name):
    assert torch_results[name]["losses"] == pytest.approx(torch_results["ddp"]["losses"], rel=1e-5)
