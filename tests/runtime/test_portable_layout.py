"""Issue 21 (2): checkpoints in an engine's own layout (written before portable checkpoints, or by
DeepSpeed for block-wise optimizer states) load only on the engine and world size that wrote them; any
other resume is refused with one clear error instead of loading garbage. One process, a real gloo group."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist


@pytest.fixture
def group():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from shardtrain.launcher.rankstart import free_port
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class _Eng:
    from shardtrain.compiler.specs import Engine
    kind = Engine.DEEPSPEED
    scaler = None

    def __init__(self):
        self.model = torch.nn.Linear(2, 2)


@pytest.mark.parametrize("files, wrote, why", [
    (["mp_rank_00_model_states.pt"], {"strategy": "zero2", "world_size": 2}, "deepspeed's own layout"),
    (["model.pt", "optimizer.pt"], {"strategy": "ddp", "world_size": 1}, "ddp's own layout"),
])
def test_engine_layouts_load_only_where_they_were_written(group, tmp_path, files, wrote, why):
    from shardtrain.runtime.checkpoint import load_checkpoint
    for f in files:
        (tmp_path / f).write_bytes(b"")
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 3, **wrote}))
    with pytest.raises(RuntimeError) as e:
        load_checkpoint(_Eng(), tmp_path)  # a DeepSpeed engine on 1 rank
    msg = str(e.value)
    assert why in msg and f"{wrote['strategy']} on {wrote['world_size']} ranks" in msg and "--no-resume" in msg
    assert "\n" not in msg
