"""train.runner (compiler/runner.py): a plan for the HF Trainer / accelerate models their loss path — the
loss inside the root FSDP unit's forward and the fp32 logits copies of older transformers — and is checked
against HF's own `model(input_ids, labels=...)` step traced under FSDP2 (FSDPMemTracker, FakeTensorMode,
fake process group of 2 ranks), with the asymmetric truth band (-2% / +8%)."""
from __future__ import annotations

import inspect

import pytest

from shardtrain.compiler.inventory import tensor_inventory
from shardtrain.compiler.planner import evaluate_phases, plan
from shardtrain.compiler.runner import runner_path, transformers_line
from shardtrain.compiler.specs import (ActivationOffload, GradCkpt, HardwareSpec, LossMode, Method, Optimizer,
                                       Runner, Strategy, TrainSpec)
from shardtrain.config.presets import load_model_spec


def test_versions():
    assert runner_path(Runner.SHARDTRAIN).loss_in_root is False
    rp = {v: runner_path(Runner.HF_TRAINER, v) for v in ("4.44.2", "4.45.2", "4.46.0", "4.48.3", "4.49.0", None)}
    assert [(r.extra_fwd_logits_bytes, r.extra_bwd_logits_bytes) for r in rp.values()] == \
        [(2, 4), (2, 4), (4, 4), (4, 4), (0, 0), (0, 0)]
    assert all(r.loss_in_root and r.chunked_loss and not r.op_ckpt for r in rp.values())
    assert transformers_line("5.23.0") == (5, 23)
    with pytest.raises(ValueError, match="train.runner_transformers: 'latest' is not a version"):
        transformers_line("latest")


def test_installed_transformers_is_the_current_line():
    """The default (None) means the >= 4.49 loss: labels padded and shifted, no shifted copy of the logits."""
    tr = pytest.importorskip("transformers")
    from transformers.loss.loss_utils import ForCausalLMLoss
    src = inspect.getsource(ForCausalLMLoss)
    assert "logits.float()" in src and "nn.functional.pad(labels" in src and "logits[..., :-1, :]" not in src
    assert transformers_line(tr.__version__) >= (4, 49)


def test_old_transformers_adds_fp32_logits_copies():
    """transformers 4.44: the forward's loss instant holds 2 more bytes per logit, the backward 4 more."""
    m = load_model_spec("llama-3.1-8b")
    hw = HardwareSpec(gpus_per_node=1)
    groups = tensor_inventory(m, Method.LORA, 16, "all-linear")
    out = {}
    for v in (None, "4.44.2"):
        t = TrainSpec(seq_len=4096, micro_batch_size=1, global_batch_size=1, method=Method.LORA,
                      runner=Runner.HF_TRAINER, runner_transformers=v)
        _, ph, _ = evaluate_phases(m, hw, t, groups, Strategy.DDP, method=Method.LORA, optimizer=Optimizer.ADAMW,
                                   micro=1, ckpt=GradCkpt.FULL, defer=False, loss=LossMode.FULL,
                                   act_offload=ActivationOffload.NONE)
        out[v] = ph
    bsv = 4096 * m.vocab_size
    assert out["4.44.2"]["forward"].logits - out[None]["forward"].logits == 2 * bsv
    assert out["4.44.2"]["backward"].logits - out[None]["backward"].logits == 4 * bsv


SMALL = "tests/fixtures/models/small-llama-32k.json"


def _fsdp_plan(runner: Runner, ckpt: str):
    from pathlib import Path
    model = load_model_spec(str(Path(__file__).resolve().parents[1] / SMALL))
    t = TrainSpec(seq_len=2048, micro_batch_size=1, global_batch_size=2, strategy=Strategy.FSDP_FULL_SHARD,
                  grad_ckpt=GradCkpt(ckpt), loss=LossMode.FULL, runner=runner)
    return plan(model, HardwareSpec(gpus_per_node=2), t)


@pytest.mark.parametrize("ckpt", ["full", "none"])
def test_plan_matches_hf_step_traced_under_fsdp2(ckpt):
    """accelerate-style FSDP2 (each decoder layer + root), HF's own loss: the accelerate plan is within
    -2% / +8% of the trace, while our runtime's plan of the same job is clearly under it (full
    checkpointing: the root's unsharded params at the fp32 loss backward; measured -6.7% here, ~12% on
    Llama-3.2-1B in the issue)."""
    pytest.importorskip("torch")
    from shardtrain.trace import trace_plan
    p = _fsdp_plan(Runner.ACCELERATE, ckpt)
    res = trace_plan(p)
    untraced = sum(res.per_phase[res.peak_phase].get(k, 0) for k in res.untraced)
    traced = res.total - untraced
    planned = p.chosen.per_gpu.total - untraced
    assert -0.02 * traced <= planned - traced <= 0.08 * traced, (planned, traced, res.per_phase)
    ours = _fsdp_plan(Runner.SHARDTRAIN, ckpt).chosen.per_gpu.total - untraced
    assert ours < planned
    if ckpt == "full":
        assert ours < 0.96 * traced   # the term this runner adds is real: without it, an under-estimate


def test_runner_transformers_without_hf_runner_is_ignored_in_one_line(capsys):
    from shardtrain.cli import main
    rc = main(["plan", "--model", "llama-3.2-1b", "--set", "train.runner_transformers=4.44.2"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "runner_transformers" in ln]
    assert rc == 0 and len(err) == 1 and "ignored, train.runner is shardtrain" in err[0]
    rc = main(["plan", "--model", "llama-3.2-1b", "--runner", "hf_trainer", "--set", "train.runner_transformers=4.44.2"])
    assert rc == 0 and "runner_transformers" not in capsys.readouterr().err


def test_emit_formats_plan_for_their_runner(capsys):
    """`emit --format accelerate | trainer | trainer-args` plans for that runner (here: op SAC is refused,
    which only the HF runners do); --runner shardtrain overrides it; other formats keep our runtime."""
    from shardtrain.cli import main
    base = ["emit", "--model", "llama-3.1-8b", "--gpus-per-node", "8", "--seq-len", "4096", "--global-batch", "8",
            "--strategy", "fsdp_full_shard", "--grad-ckpt", "op"]
    for fmt, runner in (("accelerate", "accelerate"), ("trainer-args", "hf_trainer")):
        rc = main([*base, "--format", fmt])
        err = capsys.readouterr().err
        assert rc != 0 and f"grad_ckpt: op cannot run under runner {runner}" in err, err
    assert main([*base, "--format", "accelerate", "--runner", "shardtrain"]) == 0
    capsys.readouterr()
    assert main([*base, "--format", "fsdp"]) == 0
