"""Tiled MLP and checkpoint offload in the compiler (issue 20, points 2 and 3: the planning half): hand-computed
per-phase bytes for a tiny Llama with and without each saver, the auto choices, host RAM and step time charged,
keys / flags / plan JSON round trips, the ignored-setting warnings and one-line errors for bad values."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from shardtrain.cli import main
from shardtrain.compiler import savers
from shardtrain.compiler.inventory import tensor_inventory
from shardtrain.compiler.memory import HOST_BYTES_PER_RANK, model_state_bytes, shard_group_size
from shardtrain.compiler.phases import candidate_phases
from shardtrain.compiler.plan import Plan
from shardtrain.compiler.planner import NoFitError, plan
from shardtrain.compiler.specs import (ActivationOffload, Attention, CkptOffload, GradCkpt, HardwareSpec, LossMode,
                                       Method, Optimizer, ParallelDims, Precision, Strategy, TrainSpec)
from shardtrain.config.ignored import ignored_settings
from shardtrain.config.presets import load_model_spec
from shardtrain.config.resolve import resolve_train
from shardtrain.config.schema import ConfigError, parse_run_config

BF16 = Precision.BF16
# tiny Llama with 6 layers (so the checkpointed inputs are many) and a small vocabulary (so a layer's backward,
# not the logits, is the backward peak)
M = load_model_spec("tiny-llama").with_dims(num_layers=6, vocab_size=64)
H, I, L = M.hidden_size, M.intermediate_size, M.num_layers
HW = HardwareSpec(nodes=1, gpus_per_node=1)


def _phases(*, tiles=1, ckpt_offload=False, ckpt=GradCkpt.FULL, seq=4096, strategy=Strategy.ZERO2):
    groups = tensor_inventory(M, Method.FULL, lora_rank=4)
    ms = model_state_bytes(M, groups, strategy, HW, method=Method.FULL, precision=BF16, optimizer=Optimizer.ADAMW)
    ph, _ = candidate_phases(M, groups, strategy, ms, shard_size=shard_group_size(strategy, HW), method=Method.FULL,
                             precision=BF16, optimizer=Optimizer.ADAMW, micro_batch=1, seq_len=seq,
                             attention=Attention.SDPA, grad_ckpt=ckpt, selective_every=2, grad_accum=1,
                             defer_grad_sync=False, loss=LossMode.FULL, tiled_mlp_tiles=tiles,
                             ckpt_offload=ckpt_offload)
    return ph


def test_tiled_mlp_bytes_hand_computed():
    s, n = 4096, 8
    base, tiled = _phases(), _phases(tiles=n)
    # the backward peak is a layer's recompute: its saved MLP intermediates (gate, up, silu, product:
    # 4·I·2 bytes per token) are replaced by one tile's 4 intermediates + 3 gradients and x_grad (2·h per token);
    # the untiled MLP's backward gradients beside them (2·I·2, activations.mlp_backward_extra_per_token) go too;
    # either way the layer's backward working set is at least the RMSNorm backward's 3 fp32 h-wide temporaries
    tiled_extra = max(7 * I * 2 * math.ceil(s / n) + 2 * H * s, 3 * 4 * H * s)
    want = -4 * I * 2 * s + tiled_extra - max(2 * I * 2 * s, 3 * 4 * H * s)
    assert tiled["backward"].activations - base["backward"].activations == want
    assert want < 0
    # under full checkpointing nothing else changes: the forward keeps only the layers' inputs either way
    assert tiled["forward"].activations == base["forward"].activations
    # without checkpointing every layer saves only the MLP input: L layers' intermediates go
    none_base, none_tiled = _phases(ckpt=GradCkpt.NONE), _phases(ckpt=GradCkpt.NONE, tiles=n)
    assert none_base["forward"].activations - none_tiled["forward"].activations == L * 4 * I * 2 * s
    assert savers.tile_working_bytes(M, BF16, s, 1) == 0


def test_ckpt_offload_bytes_hand_computed():
    s = 4096
    resid = 2 * H * s   # one checkpointed layer's bf16 input
    base, off = _phases(), _phases(ckpt_offload=True)
    # forward: the L inputs go to the host but one (the copy in flight)
    assert base["forward"].activations - off["forward"].activations == (L - 1) * resid
    # backward: the layer recomputing has its input back, the next one is prefetched
    assert base["backward"].activations - off["backward"].activations == (L - 2) * resid
    # with no checkpointed layer there is nothing to move
    assert _phases(ckpt=GradCkpt.NONE, ckpt_offload=True) == _phases(ckpt=GradCkpt.NONE)


def test_auto_tiles_follow_deepspeed():
    m8 = load_model_spec("llama-3.1-8b")
    # DeepSpeed TiledMLP: num_shards = ceil(seqlen / hidden_size) on the rank's sequence; at least 2 here
    assert savers.auto_tiles(m8, 131072) == 32
    assert savers.auto_tiles(m8, 131072, ParallelDims(dp_shard=1, cp=8)) == 4
    assert savers.auto_tiles(m8, 1000) == 2
    # one more MLP forward per step: 3 matmuls of h·I per layer
    assert savers.mlp_forward_flops_per_token(m8) == 2 * 3 * 4096 * 14336 * 32


def test_saver_options_order_and_rules():
    opts = savers.saver_options(M, TrainSpec(seq_len=4096))
    n = savers.auto_tiles(M, 4096)
    assert [(o.tiles, o.ckpt_offload, o.activation_offload.value) for o in opts] == [
        (1, False, "none"), (n, False, "none"), (1, True, "none"), (n, True, "none")]
    forced = savers.saver_options(M, TrainSpec(tiled_mlp=1, ckpt_offload=CkptOffload.CPU))
    assert [(o.tiles, o.ckpt_offload) for o in forced] == [(1, True)]
    # activation offload cpu + ckpt offload cpu: activation offload alone (it moves those inputs already)
    both = savers.saver_options(M, TrainSpec(tiled_mlp=1, ckpt_offload=CkptOffload.CPU,
                                             activation_offload=ActivationOffload.CPU))
    assert [(o.activation_offload.value, o.ckpt_offload) for o in both] == [("none", False), ("cpu", False)]


def _train(**kw):
    return TrainSpec(**{**dict(seq_len=32768, micro_batch_size=1, global_batch_size=1, method=Method.LORA,
                              loss=LossMode.CHUNKED, strategy=Strategy.DDP), **kw})


M8 = load_model_spec("llama-3.1-8b")
ONE = dict(gpus_per_node=1)


def test_auto_uses_savers_only_when_needed():
    roomy = plan(M8, HardwareSpec(**ONE, gpu_memory_bytes=140 * 2**30), _train(seq_len=8192))
    assert (roomy.chosen.tiled_mlp_tiles, roomy.chosen.ckpt_offload) == (1, False)
    # 8B LoRA at 64k on 58 GiB without checkpoint offload: fits only with a tiled MLP, DeepSpeed's tile count
    t = _train(seq_len=65536, ckpt_offload=CkptOffload.OFF)
    tiled = plan(M8, HardwareSpec(**ONE, gpu_memory_bytes=58 * 2**30), t)
    assert tiled.chosen.tiled_mlp_tiles == savers.auto_tiles(M8, 65536) == 16
    assert any(r.startswith("tiled MLP 16 tiles (auto, ceil(65,536 tokens / hidden 4096)") for r in tiled.reasons)
    with pytest.raises(NoFitError):
        plan(M8, HardwareSpec(**ONE, gpu_memory_bytes=58 * 2**30), replace(t, tiled_mlp=1))
    # on 42 GiB it takes both savers, and neither alone fits
    both = plan(M8, HardwareSpec(**ONE, gpu_memory_bytes=42 * 2**30), replace(t, ckpt_offload=CkptOffload.AUTO))
    assert (both.chosen.tiled_mlp_tiles, both.chosen.ckpt_offload) == (16, True)
    for alone in (dict(tiled_mlp=1), dict(ckpt_offload=CkptOffload.OFF)):
        with pytest.raises(NoFitError):
            plan(M8, HardwareSpec(**ONE, gpu_memory_bytes=42 * 2**30), replace(t, **{"ckpt_offload": CkptOffload.AUTO, **alone}))
    # the recomputed MLP forward is charged
    forced = plan(M8, HardwareSpec(**ONE, gpu_memory_bytes=140 * 2**30), _train(seq_len=8192, tiled_mlp=4))
    assert forced.chosen.tiled_mlp_tiles == 4 and forced.chosen.step_time_s > roomy.chosen.step_time_s


def test_ckpt_offload_charges_host_ram_and_pcie():
    hw = HardwareSpec(**ONE, gpu_memory_bytes=140 * 2**30)
    s = 131072
    t = _train(seq_len=s, grad_ckpt=GradCkpt.FULL, tiled_mlp=1)
    on = plan(M8, hw, replace(t, ckpt_offload=CkptOffload.CPU)).chosen
    off = plan(M8, hw, replace(t, ckpt_offload=CkptOffload.OFF)).chosen
    assert on.ckpt_offload and not off.ckpt_offload
    moved = M8.num_layers * 2 * M8.hidden_size * s   # bf16 inputs of 32 checkpointed layers, one rank
    # host RAM per node: the rank's process overhead + the inputs (more than the one-time model load here)
    assert on.cpu_memory_per_node_bytes == HOST_BYTES_PER_RANK + moved > off.cpu_memory_per_node_bytes
    assert off.per_gpu.total - on.per_gpu.total >= (M8.num_layers - 2) * 2 * M8.hidden_size * s
    assert on.step_time_s - off.step_time_s == pytest.approx(2 * moved / hw.pcie_bandwidth_bytes_per_s)


def test_ckpt_offload_auto_when_needed_to_fit():
    # 8B LoRA at 128k on 80 GiB with tiling forced: only the host copy of the inputs makes it fit
    hw = HardwareSpec(**ONE, gpu_memory_bytes=80 * 2**30)
    t = _train(seq_len=131072, grad_ckpt=GradCkpt.FULL)
    p = plan(M8, hw, t)
    assert p.chosen.ckpt_offload
    assert any(r.startswith("checkpointed layer inputs in host RAM") for r in p.reasons)
    with pytest.raises(NoFitError):
        plan(M8, hw, replace(t, ckpt_offload=CkptOffload.OFF))


def test_plan_json_round_trip():
    p = plan(M8, HardwareSpec(**ONE, gpu_memory_bytes=140 * 2**30),
             _train(seq_len=8192, grad_ckpt=GradCkpt.FULL, tiled_mlp=4, ckpt_offload=CkptOffload.CPU))
    d = p.to_json()
    assert (d["tiled_mlp_tiles"], d["ckpt_offload"]) == (4, True)
    assert (d["spec"]["train"]["tiled_mlp"], d["spec"]["train"]["ckpt_offload"]) == (4, "cpu")
    q = Plan.from_json(json.loads(json.dumps(d)))
    assert q.train == p.train and (q.chosen.tiled_mlp_tiles, q.chosen.ckpt_offload) == (4, True)
    assert q.to_json() == d
    # a plan written before these keys existed reads as untiled, no offload, auto
    for k in ("tiled_mlp_tiles", "ckpt_offload"):
        d.pop(k)
    del d["spec"]["train"]["tiled_mlp"], d["spec"]["train"]["ckpt_offload"]
    old = Plan.from_json(d)
    assert (old.chosen.tiled_mlp_tiles, old.chosen.ckpt_offload) == (1, False)
    assert old.train.tiled_mlp is None and old.train.ckpt_offload is CkptOffload.AUTO


def _cfg(**train):
    return parse_run_config({"model": {"name": "tiny-llama"}, "train": train})


@pytest.mark.parametrize("value, want", [("auto", None), ("off", 1), ("OFF", 1), (8, 8), ("8", 8), (1, 1),
                                         (None, None)])
def test_tiled_mlp_key_values(value, want):
    cfg = _cfg(tiled_mlp=value)
    assert cfg.train.tiled_mlp == want and resolve_train(cfg).tiled_mlp == want
    assert parse_run_config(cfg.to_dict()) == cfg   # run.yaml written back reads the same


@pytest.mark.parametrize("key, value", [("tiled_mlp", "lots"), ("tiled_mlp", 0), ("tiled_mlp", -2),
                                        ("tiled_mlp", "2.5"), ("tiled_mlp", True), ("ckpt_offload", "gpu"),
                                        ("ckpt_offload", 3)])
def test_bad_values_one_line_naming_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        _cfg(**{key: value})
    msg = str(e.value)
    assert msg.startswith(f"train.{key}: ") and "\n" not in msg


def test_flags_are_the_keys(capsys):
    argv = ["plan", "--model", "tiny-llama", "--gpus-per-node", "1", "--seq-len", "512", "--global-batch", "1",
            "--json"]
    capsys.readouterr()
    assert main(argv + ["--tiled-mlp", "4", "--ckpt-offload", "cpu", "--grad-ckpt", "full"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["tiled_mlp_tiles"], d["ckpt_offload"]) == (4, True)
    assert main(argv + ["--set", "train.tiled_mlp=off", "--set", "train.ckpt_offload=off"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["tiled_mlp_tiles"], d["ckpt_offload"]) == (1, False)


def test_ignored_warnings():
    lines = ignored_settings(_cfg(ckpt_offload="cpu", grad_ckpt="none"))
    assert [ln for ln in lines if ln.startswith("train.ckpt_offload: cpu: ignored, train.grad_ckpt is none")]
    lines = ignored_settings(_cfg(ckpt_offload="cpu", activation_offload="cpu"))
    assert [ln for ln in lines if "train.activation_offload is cpu" in ln]
    assert not [ln for ln in ignored_settings(_cfg(ckpt_offload="cpu", tiled_mlp=4)) if "ckpt_offload" in ln]
    # tiled MLP is its own recompute: no warning without checkpointing
    assert not [ln for ln in ignored_settings(_cfg(tiled_mlp=4, grad_ckpt="none")) if "tiled_mlp" in ln]


def test_advice_gives_the_savers_back_and_report_names_them(capsys):
    base = ["plan", "--model", "llama-3.1-8b", "--gpus-per-node", "1", "--method", "lora", "--seq-len", "122880",
            "--global-batch", "1", "--grad-ckpt", "full", "--strategy", "ddp"]
    capsys.readouterr()
    assert main(base + ["--tiled-mlp", "off", "--ckpt-offload", "off", "--json"]) == 2   # nothing fits
    sets = [s["set"] for s in json.loads(capsys.readouterr().out)["suggestions"]]
    # checkpoint offload alone fits; the tiled MLP alone does not, so it is not offered
    assert {"train.ckpt_offload": "auto"} in sets and {"train.tiled_mlp": "auto"} not in sets
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "\nsavers     checkpointed layer inputs in host RAM" in out
