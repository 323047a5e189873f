"""The CUDA caching allocator model (compiler/allocator.py): request rounding and segment sizes by hand
from c10/cuda/CUDACachingAllocator.cpp, expandable vs default segments, monotonicity, the plan's three
reported figures (JSON round trip, fit rule), and published runs that report both peaks."""
from __future__ import annotations

import json

import pytest

from shardtrain.compiler import allocator as al
from shardtrain.compiler.inventory import TensorGroup
from shardtrain.compiler.plan import MemoryBreakdown, Plan
from shardtrain.compiler.planner import NoFitError
from shardtrain.compiler.planner import plan as make_plan
from shardtrain.compiler.specs import (CkptOffload, Engine, GradCkpt, HardwareSpec, LossMode, ParallelRequest, Strategy,
                                       TrainSpec)
from shardtrain.config import pipeline
from shardtrain.config.ignored import ignored_settings
from shardtrain.config.presets import load_model_spec
from shardtrain.report import render_plan
from shardtrain.units import GiB, MiB


# ---- rounding and segments, by hand from the allocator's source
@pytest.mark.parametrize("size, divisions, expected", [
    (1, 0, 512), (512, 0, 512), (513, 0, 1024), (1_000_000, 0, 1_000_448),
    (1200, 4, 1536),        # not above 512 * 4: round_size keeps plain 512-byte rounding
    (1024, 4, 1024),        # a power of two stays
    (2000, 4, 2048),        # not above 512 * divisions: plain 512-byte rounding
    (3000, 4, 3072),        # 2048 + k * 512 -> 3072
    (5 * MiB + 1, 8, 5 * MiB + 512 * 1024),   # 4 MiB floor, 512 KiB steps
])
def test_round_size(size, divisions, expected):
    assert al.round_size(size, divisions) == expected


def test_power2_division_example_of_the_source():
    # roundup_power2_next_division's comment: 1200 with 4 divisions of [1024, 2048) -> 1280
    assert al._roundup_power2_next_division(1200, 4) == 1280
    assert al._roundup_power2_next_division(1024, 4) == 1024


@pytest.mark.parametrize("rounded, seg", [
    (512, 2 * MiB), (1 * MiB, 2 * MiB),                       # small pool: 2 MiB segments
    (1 * MiB + 512, 20 * MiB), (10 * MiB - 512, 20 * MiB),     # 1-10 MiB: shared 20 MiB segments
    (10 * MiB, 10 * MiB), (10 * MiB + 512, 12 * MiB),          # >= 10 MiB: own segment, 2 MiB rounding
    (33 * MiB, 34 * MiB),
])
def test_segment_size(rounded, seg):
    assert al.segment_size(rounded) == seg


@pytest.mark.parametrize("size, count, default, expandable", [
    (8 * MiB, 3, 40 * MiB, 24 * MiB),       # two 8 MiB blocks per 20 MiB segment -> 2 segments
    (4 * MiB, 5, 20 * MiB, 20 * MiB),       # five fill one segment exactly
    (4 * MiB, 6, 40 * MiB, 24 * MiB),
    (33 * MiB, 3, 3 * 34 * MiB, 99 * MiB),  # one 34 MiB segment each
    (100, 5000, 4 * MiB, 5000 * 512),       # 4096 blocks of 512 B per 2 MiB small segment
    (0, 7, 0, 0),
])
def test_reserved_for(size, count, default, expandable):
    assert al.reserved_for(size, count) == default
    assert al.reserved_for(size, count, expandable=True) == expandable


def test_persistent_slack_by_hand():
    g = (TensorGroup("w", (4096, 4096), 2, trainable=True),)
    # bf16 weights of 32 MiB: one exact 32 MiB segment each, nothing wasted
    assert al.persistent_slack(g, {"params": 2 * 2 * 4096 * 4096}, expandable=False) == 0
    # a third of each (FSDP shard of 3): 11,184,811 B -> rounded 11,185,152 -> a 12 MiB segment each
    shard = -(-2 * 4096 * 4096 // 3)
    assert al.persistent_slack(g, {"params": 2 * shard}, expandable=False) == 2 * (12 * MiB - shard)
    assert al.persistent_slack(g, {"params": 2 * shard}, expandable=True) == 2 * (al.round_size(shard) - shard)
    # gradients / states count only trainable tensors
    frozen = (TensorGroup("w", (4096, 4096), 2, trainable=False),)
    assert al.persistent_slack(frozen, {"grads": 10 * MiB}, expandable=False) == 0


def _bd(*, states: int, act: int, logits: int = 0, buffers: int = 0, ctx: int = 768 * MiB) -> MemoryBreakdown:
    return MemoryBreakdown(params=states, grads=0, master_params=0, optimizer_states=0, activations=act,
                           logits=logits, buffers=buffers, cuda_context=ctx)


def test_reserved_at_least_allocated_and_monotonic():
    prev = None
    for act in (0, 1 * GiB, 4 * GiB, 16 * GiB):
        for exp in (False, True):
            f = al.predict({"backward": _bd(states=10 * GiB, act=act)}, (), Engine.FSDP, expandable=exp)
            assert f.peak_allocated_bytes == 10 * GiB + act
            assert f.peak_reserved_bytes >= f.peak_allocated_bytes
            assert f.nvidia_smi_bytes == f.peak_reserved_bytes + 768 * MiB
        r = al.predict({"backward": _bd(states=10 * GiB, act=act)}, (), Engine.FSDP, expandable=False)
        if prev is not None:
            assert r.peak_reserved_bytes > prev.peak_reserved_bytes
        prev = r


def test_expandable_fragments_less_and_high_water_mark_over_phases():
    phases = {"forward": _bd(states=4 * GiB, act=20 * GiB), "optimizer": _bd(states=26 * GiB, act=0)}
    default = al.predict(phases, (), Engine.FSDP, expandable=False)
    exp = al.predict(phases, (), Engine.FSDP, expandable=True)
    # the allocated peak is the optimizer's (26 GiB) but the forward's 20 GiB of activations fragment:
    # reserved is the forward's 24 GiB + 0.45 * 20 GiB = 33 GiB
    assert default.peak_allocated_bytes == 26 * GiB
    assert default.peak_reserved_bytes == 24 * GiB + int(0.45 * 20 * GiB)
    assert exp.peak_reserved_bytes < default.peak_reserved_bytes
    assert exp.peak_reserved_bytes == 26 * GiB + 4 * 20 * MiB + 2 * MiB   # optimizer phase + pages


# ---- published runs that report both peaks for the same run (the constants were fitted to these):
# (source, engine, allocated, reserved, transient share of the allocated peak: the assumption stated)
PUBLISHED = [
    # meta-llama/llama-cookbook#41 (awgu, 2023-07-25): Llama-2-7B LoRA, FSDP, 4 x A100-40GB, pure bf16,
    # "15.22 GB peak active memory and 19.36 GB peak reserved memory"; the frozen bf16 weights sharded 4
    # ways (3.37 GB) are the persistent part: transient 78%
    ("llama-cookbook#41", Engine.FSDP, 15.22e9, 19.36e9, 0.78),
    # meta-llama/llama-cookbook#165 (awgu, 2023-09-05): Llama-7B, 8 GPUs, per-parameter FSDP prototype:
    # "Peak active: 14.93 GB, Peak reserved: 19.52 GB"; transient share assumed 70%
    ("llama-cookbook#165", Engine.FSDP, 14.93e9, 19.52e9, 0.70),
    # huggingface/peft#1469 (2024, torchtune get_memory_stats, GiB): bert-base-uncased on one GPU, full
    # fine-tuning 12.5596 -> 12.9395 and peft LoRA 10.0056 -> 10.4434; fp32 model + AdamW 1.64 GiB of
    # states (full), 0.41 GiB weights (LoRA): transient 87% / 96%
    ("peft#1469 bert full", Engine.DDP, 12.559592724 * GiB, 12.939453125 * GiB, 0.87),
    ("peft#1469 bert lora", Engine.DDP, 10.005623817 * GiB, 10.443359375 * GiB, 0.96),
]


@pytest.mark.parametrize("src, engine, allocated, reserved, share", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_reserved_not_under_predicted(src, engine, allocated, reserved, share):
    act = int(allocated * share)
    f = al.predict({"backward": _bd(states=int(allocated) - act, act=act)}, (), engine, expandable=False)
    err = f.peak_reserved_bytes / reserved - 1
    assert -0.02 <= err <= 0.08, f"{src}: reserved predicted {f.peak_reserved_bytes / 1e9:.2f} GB vs {reserved / 1e9:.2f}"


@pytest.mark.xfail(strict=True, reason="shapes that change every step (unpacked, padded per batch) fragment the "
                   "default allocator far more than the fixed-shape model says: torchtune#1185, Llama-3-8B QLoRA on "
                   "one A100, reserved 16.39 GiB default vs 10.831 GiB expandable (x1.51); the model gives ~x1.05")
def test_variable_shapes_fragmentation_is_not_modelled():
    bd = {"backward": _bd(states=6 * GiB, act=4 * GiB)}   # ~10 GiB allocated, QLoRA-like split
    ratio = (al.predict(bd, (), Engine.DDP, expandable=False).peak_reserved_bytes
             / al.predict(bd, (), Engine.DDP, expandable=True).peak_reserved_bytes)
    assert ratio >= 16.39 / 10.831 * 0.98


# ---- the plan: fields, JSON, fit rule, report lines
def _plan(expandable: bool, gpu_gib: int = 80, **train):
    m = load_model_spec("llama-3.1-8b")
    hw = HardwareSpec(nodes=1, gpus_per_node=8, gpu_memory_bytes=gpu_gib * GiB, expandable_segments=expandable)
    # micro batch 2: enough saved activations that the default allocator's fragmentation share exceeds FSDP2's
    # side-stream pools (at micro batch 1 with full checkpointing they dominate: both allocators hold the same)
    t = TrainSpec(seq_len=4096, global_batch_size=64, micro_batch_size=2, strategy=Strategy.FSDP_FULL_SHARD,
                  grad_ckpt=GradCkpt.FULL, **train)
    return make_plan(m, hw, t)


def test_plan_reports_three_figures_and_fits_on_reserved():
    p = _plan(True)
    c = p.chosen
    d = p.to_json()
    assert d["peak_allocated_bytes"] == c.per_gpu.total - c.per_gpu.cuda_context
    assert d["peak_reserved_bytes"] == c.peak_reserved_bytes > d["peak_allocated_bytes"]
    assert d["nvidia_smi_bytes"] == c.peak_reserved_bytes + c.per_gpu.cuda_context == c.gpu_need_bytes
    assert c.fits and c.gpu_need_bytes <= p.gpu_memory_bytes - p.headroom_bytes
    back = Plan.from_json(json.loads(json.dumps(d)))
    assert back.chosen.peak_reserved_bytes == c.peak_reserved_bytes
    assert back.hardware.expandable_segments is True
    # the default allocator: same candidate, more reserved
    q = _plan(False)
    assert q.chosen.key == c.key and q.chosen.allocated_bytes == c.allocated_bytes
    assert q.chosen.peak_reserved_bytes > c.peak_reserved_bytes
    text = render_plan(q)
    for label in ("allocated", "reserved (predicted)", "nvidia-smi (predicted)", "no expandable segments"):
        assert label in text


_FIXED = dict(loss=LossMode.FULL, ckpt_offload=CkptOffload.OFF, tiled_mlp=1, parallel=ParallelRequest(cp=1))
"""No saver or mesh the planner could add to make the tighter GPU fit (the test is about the fit rule)."""


def test_fit_rule_uses_reserved_plus_context():
    # a GPU between the allocated+context figure and the reserved+context figure: does not fit
    need = _plan(False, **_FIXED).chosen
    gib = -(-(need.per_gpu.total + need.gpu_need_bytes) // 2 // GiB)
    assert need.per_gpu.total < gib * GiB < need.gpu_need_bytes
    with pytest.raises(NoFitError) as e:
        _plan(False, gpu_gib=gib, **_FIXED)
    c = e.value.plan.chosen
    assert not c.fits and any("(reserved + CUDA context) >" in w for w in c.why_not)
    assert _plan(True, gpu_gib=gib, **_FIXED).chosen.fits   # expandable segments: the same job fits that GPU


def test_old_plan_json_reads_allocated_as_reserved():
    d = _plan(True).to_json()
    del d["peak_reserved_bytes"]
    del d["spec"]["hardware"]["expandable_segments"]
    old = Plan.from_json(d)
    assert old.chosen.peak_reserved_bytes == 0
    assert old.chosen.reserved_bytes == old.chosen.allocated_bytes
    assert old.chosen.gpu_need_bytes == old.chosen.per_gpu.total
    assert old.hardware.expandable_segments is True


def test_config_key_flag_and_headroom_warning():
    base = {"model": {"name": "llama-3.1-8b"}, "hardware": {"gpus_per_node": 8},
            "train": {"seq_len": 2048, "global_batch": 64}}
    cfg, p = pipeline.compile(base, {"hardware.expandable_segments": "false"})
    assert cfg.hardware.expandable_segments is False and p.hardware.expandable_segments is False
    assert cfg.train.headroom == 0.0 and p.headroom_bytes == 0
    assert not any("headroom" in ln for ln in ignored_settings(cfg))
    cfg2, p2 = pipeline.compile(base, {"train.headroom": 0.05})
    warn = [ln for ln in ignored_settings(cfg2) if ln.startswith("train.headroom")]
    assert len(warn) == 1 and "ON TOP of the modelled reserved peak" in warn[0]
    assert p2.headroom_bytes == p2.gpu_memory_bytes - int(p2.gpu_memory_bytes * 0.95)
    with pytest.raises(Exception, match="hardware.expandable_segments"):
        pipeline.compile(base, {"hardware.expandable_segments": "maybe"})


def test_flag_spelling():
    from shardtrain.config.flags import PLAN_FLAGS
    row = {f.flag: f.key for f in PLAN_FLAGS}
    assert row["--expandable-segments"] == "hardware.expandable_segments"
