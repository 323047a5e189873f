"""FSDP2 settings from plans: sharding flags, meshes, dtypes, the wrap class resolved from the real
transformers model class, JSON round trip, and a real fully_shard wrap + step with the settings built
into torch objects the way the runtime does it (runtime/fsdp_wrap.py; world size 1, gloo)."""
from __future__ import annotations

import json
import os

import pytest

from emit_plans import make_plan
from shardtrain.config.presets import load_model_spec
from shardtrain.emit.fsdp import FsdpSettings, fsdp_settings, transformers_layer_class


@pytest.mark.parametrize("strategy,reshard,mesh", [("fsdp_full_shard", True, (8,)),
                                                   ("fsdp_shard_grad_op", False, (8,)),
                                                   ("fsdp_hybrid_shard", True, (2, 4))])
def test_sharding_and_mesh(strategy, reshard, mesh):
    nodes, gpn = (2, 4) if "hybrid" in strategy else (1, 8)
    f = fsdp_settings(make_plan(strategy, nodes=nodes, gpus_per_node=gpn))
    assert f.reshard_after_forward is reshard and f.mesh_shape == mesh and len(f.mesh_dim_names) == len(mesh)
    assert f.version == 2 and f.reduce_dtype == "float32" and f.world_size == 8


def test_dtypes_checkpointing_and_qlora():
    f = fsdp_settings(make_plan("fsdp_full_shard", precision="fp32", grad_ckpt="selective"))
    assert f.param_dtype == "float32" and f.activation_checkpointing == "selective" and f.checkpoint_every == 2
    q = fsdp_settings(make_plan("fsdp_full_shard", method="qlora", grad_ckpt="full"))
    assert q.quant_storage_dtype == q.param_dtype == "bfloat16" and q.checkpoint_every == 1
    assert fsdp_settings(make_plan("fsdp_full_shard")).quant_storage_dtype is None


@pytest.mark.parametrize("preset", ["llama-3.1-8b", "mistral-7b", "mixtral-8x7b", "qwen2.5-7b", "gemma-2-9b",
                                    "phi-3-mini"])
def test_wrap_class_from_the_real_model_class(preset):
    import transformers
    spec = load_model_spec(preset)
    name, source = transformers_layer_class(spec.model_type)
    assert source.startswith("transformers:")
    model_cls = getattr(transformers, source.split(":")[1].split(".")[0])
    module = __import__(model_cls.__module__, fromlist=[name])
    assert isinstance(getattr(module, name), type)  # the class really exists in the modeling file
    # read from transformers' source without importing it: the same answer as the imported class
    assert name == model_cls._no_split_modules[0]


def test_unknown_model_type_falls_back_to_the_spec():
    assert transformers_layer_class("no-such-model-type") is None


def test_round_trip_and_strict_loading():
    f = fsdp_settings(make_plan("fsdp_hybrid_shard", nodes=2, gpus_per_node=2))
    d = json.loads(json.dumps(f.to_dict()))
    assert FsdpSettings.from_dict(d) == f
    with pytest.raises(ValueError, match="unknown keys"):
        FsdpSettings.from_dict({**d, "reshard": True})
    with pytest.raises(ValueError, match="FSDP2"):
        FsdpSettings.from_dict({**d, "version": 1})


def test_non_fsdp_plan_raises():
    with pytest.raises(ValueError, match="not an FSDP strategy"):
        fsdp_settings(make_plan("zero2"))


def test_fully_shard_with_the_settings_takes_a_step():
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    import ds_step
    from shardtrain.runtime.fsdp_wrap import shard_model
    from shardtrain.runtime.modeling import decoder_layers
    f = fsdp_settings(make_plan("fsdp_full_shard", grad_ckpt="none"))
    f = FsdpSettings.from_dict({**f.to_dict(), "offload_pin_memory": False})  # CPU host: no pinned memory
    own = not dist.is_initialized()
    if own:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{29900 + os.getpid() % 90}")
    try:
        model = ds_step.tiny_model()
        units = decoder_layers(model, f.wrap_class)
        assert len(units) == model.config.num_hidden_layers
        shard_model(model, f, "cpu", units)
        assert all(isinstance(m, FSDPModule) for m in [model, *units])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, 512, (2, 16))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    finally:
        if own:
            dist.destroy_process_group()
