"""Chunked loss and activation offload in the compiler, the CLI and emit (issue 10): the logits term per
loss mode, `auto` resolution with a reason, offload chosen only when nothing faster fits (host RAM and
PCIe charged), JSON round trip, the example that fits only with chunked loss, and the emitted notes."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from shardtrain.cli import main
from shardtrain.compiler.activations import activation_host_bytes, logits_bytes, resolve_loss
from shardtrain.compiler.plan import Plan
from shardtrain.compiler.planner import NoFitError, plan
from shardtrain.compiler.specs import (ActivationOffload, Attention, GradCkpt, HardwareSpec, LossMode, Method,
                                       Precision, TrainSpec)
from shardtrain.config.presets import load_model_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "examples" / "llama3-8b-qlora-16k-1x24gb.yaml"
ISSUE_FLAGS = ["plan", "--model", "llama-3.1-8b", "--gpus-per-node", "1", "--gpu-memory", "24GiB", "--method", "qlora",
               "--grad-ckpt", "full", "--seq-len", "2048", "--micro-batch", "2", "--global-batch", "2", "--json"]


def _json(capsys, argv) -> dict:
    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def _logits_term(d: dict) -> int:
    """The plan's logits term (logits_path_bytes: per_gpu/per_phase show it only where it is the peak)."""
    phases = d.get("per_phase") or {"peak": d["per_gpu"]}
    assert d["logits_path_bytes"] >= max(p["logits"] for p in phases.values())
    return d["logits_path_bytes"]


def test_issue_command_logits_at_least_5x_smaller(capsys):
    full = _json(capsys, ISSUE_FLAGS + ["--loss", "full"])
    chunked = _json(capsys, ISSUE_FLAGS + ["--loss", "chunked"])
    assert full["loss"] == "full" and chunked["loss"] == "chunked"
    assert _logits_term(full) >= 5 * _logits_term(chunked) > 0
    assert chunked["per_gpu"]["total"] < full["per_gpu"]["total"]
    assert any("loss chunked" in r for r in chunked["reasons"])


def _llama8b():
    return load_model_spec("llama-3.1-8b")


def test_logits_bytes_per_mode():
    m = _llama8b()
    kw = dict(micro_batch=2, seq_len=2048, precision=Precision.BF16)
    b, s, V, h = 2, 2048, m.vocab_size, m.hidden_size
    assert logits_bytes(m, **kw) == logits_bytes(m, loss=LossMode.FULL, **kw) == b * s * V * 14
    assert logits_bytes(m, loss=LossMode.CHUNKED, chunk_tokens=512, **kw) == 12 * 512 * V + 2 * b * s * h
    # a chunk larger than the micro-batch is the micro-batch
    assert logits_bytes(m, loss=LossMode.CHUNKED, chunk_tokens=10**6, **kw) == 12 * b * s * V + 2 * b * s * h
    # positional/keyword compatibility of the old signature
    assert logits_bytes(m, micro_batch=1, seq_len=8, precision=Precision.FP32) == 8 * V * 12


def test_auto_resolves_by_size():
    m = _llama8b()
    assert resolve_loss(m, micro_batch=1, seq_len=4096, precision=Precision.BF16, loss=LossMode.AUTO,
                        chunk_tokens=512) is LossMode.CHUNKED
    # fp32 and a micro-batch no larger than one chunk: chunking saves nothing
    assert resolve_loss(m, micro_batch=1, seq_len=256, precision=Precision.FP32, loss=LossMode.AUTO,
                        chunk_tokens=512) is LossMode.FULL
    p = plan(m, HardwareSpec(gpus_per_node=1, gpu_memory_bytes=80 * 2**30),
             TrainSpec(seq_len=4096, micro_batch_size=1, global_batch_size=8, method=Method.LORA, loss=LossMode.AUTO))
    # issue 19: auto picks chunked only where it lets a faster plan fit (tests/test_loss_auto_default.py);
    # with 80 GiB the full path fits at the fastest point, and the plan says so
    assert p.chosen.loss is LossMode.FULL
    assert any(r.startswith("loss auto → full") for r in p.reasons)


def test_activation_offload_only_when_nothing_faster_fits():
    m = _llama8b()
    # tiled_mlp off: this is about activation offload alone (auto tiling also shrinks what it moves:
    # tests/test_long_context_plan.py)
    train = TrainSpec(seq_len=8192, micro_batch_size=1, global_batch_size=8, method=Method.LORA,
                      grad_ckpt=GradCkpt.NONE, loss=LossMode.CHUNKED, activation_offload=ActivationOffload.CPU,
                      tiled_mlp=1)
    roomy = plan(m, HardwareSpec(gpus_per_node=1, gpu_memory_bytes=140 * 2**30), train)
    assert roomy.chosen.activation_offload is ActivationOffload.NONE
    assert any("allowed but not used" in r for r in roomy.reasons)
    tight = plan(m, HardwareSpec(gpus_per_node=1, gpu_memory_bytes=48 * 2**30), train)
    assert tight.chosen.activation_offload is ActivationOffload.CPU
    assert any("offloaded to host RAM" in r for r in tight.reasons)
    with pytest.raises(NoFitError):   # without the permission nothing fits
        plan(m, HardwareSpec(gpus_per_node=1, gpu_memory_bytes=48 * 2**30),
             replace(train, activation_offload=ActivationOffload.NONE))
    # host RAM per node and PCIe time are charged
    kw = dict(micro_batch=1, seq_len=8192, precision=Precision.BF16, attention=Attention.SDPA, grad_ckpt=GradCkpt.NONE)
    moved = activation_host_bytes(m, offload=ActivationOffload.CPU, **kw)
    assert moved > 0 and activation_host_bytes(m, **kw) == 0
    assert tight.chosen.cpu_memory_per_node_bytes >= moved
    offload_alt = [c for c in roomy.alternatives + (roomy.chosen,)]
    assert all(c.activation_offload is ActivationOffload.NONE or c.step_time_s > roomy.chosen.step_time_s
               for c in offload_alt)


def test_offload_with_checkpointing_moves_only_layer_inputs():
    m = _llama8b()
    kw = dict(micro_batch=1, seq_len=4096, precision=Precision.BF16, attention=Attention.SDPA,
              offload=ActivationOffload.CPU)
    assert activation_host_bytes(m, grad_ckpt=GradCkpt.FULL, **kw) == m.num_layers * 2 * m.hidden_size * 4096


def test_plan_json_round_trip_keeps_savers():
    m = _llama8b()
    p = plan(m, HardwareSpec(gpus_per_node=1, gpu_memory_bytes=48 * 2**30),
             TrainSpec(seq_len=8192, micro_batch_size=1, global_batch_size=8, method=Method.LORA,
                       grad_ckpt=GradCkpt.NONE, loss=LossMode.CHUNKED, loss_chunk_tokens=256,
                       activation_offload=ActivationOffload.CPU))
    d = p.to_json()
    assert (d["loss"], d["loss_chunk_tokens"], d["activation_offload"]) == ("chunked", 256, "cpu")
    q = Plan.from_json(json.loads(json.dumps(d)))
    assert q.train == p.train and q.chosen.loss is LossMode.CHUNKED
    assert q.chosen.activation_offload is ActivationOffload.CPU
    # plan.json written before these keys existed still loads (full loss, no offload)
    old = json.loads(json.dumps(d))
    for k in ("loss", "loss_chunk_tokens", "activation_offload"):
        old.pop(k)
        old["spec"]["train"].pop(k)
    r = Plan.from_json(old)
    assert r.chosen.loss is LossMode.FULL and r.train.loss is LossMode.FULL


def test_example_fits_only_with_chunked_loss(capsys):
    d = _json(capsys, ["plan", str(EXAMPLE), "--json"])
    assert d["fits"] and d["loss"] == "chunked"
    capsys.readouterr()
    assert main(["plan", str(EXAMPLE), "--loss", "full"]) == 2
    err = capsys.readouterr().err
    assert "To fit, try" in err and "--loss chunked -> ddp, 18.0 GiB per GPU" in err  # re-planned advice (issue 22)


def test_bad_loss_value_is_one_line(capsys):
    assert main(["plan", str(EXAMPLE), "--loss", "chunky"]) == 1
    err = capsys.readouterr().err.strip()
    assert "train.loss" in err and "chunked" in err and len(err.splitlines()) == 1


def test_emit_says_which_loss(capsys):
    capsys.readouterr()
    assert main(["emit", str(EXAMPLE), "--format", "accelerate"]) == 0
    out = capsys.readouterr().out
    assert "CHUNKED loss" in out.split("compute_environment")[0]
    from shardtrain.config.resolve import resolve_specs
    from shardtrain.config.schema import load_run_config
    from shardtrain.emit.deepspeed import trainer_arguments
    p = plan(*resolve_specs(load_run_config(EXAMPLE)))
    kw = trainer_arguments(p)
    assert kw["use_liger_kernel"] and kw["liger_kernel_config"]["fused_linear_cross_entropy"]
    from transformers import TrainingArguments
    TrainingArguments(output_dir="/tmp/unused", **{**kw, "bf16": False}, use_cpu=True)  # the real class accepts them
