"""`loss: auto` is the default (issue 19 point 4): chunked exactly when it lets a faster plan fit or the full
path does not fit, full otherwise; the `why` line says which. Checked against the same job planned with the
loss forced each way (the planner's own numbers, so the rule is tested, not a constant)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardtrain.cli import main
from shardtrain.compiler.planner import NoFitError, plan
from shardtrain.compiler.specs import HardwareSpec, LossMode, Method, Runner, TrainSpec
from shardtrain.config.presets import load_model_spec
from shardtrain.config.schema import TrainConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "examples"


def test_default_is_auto():
    assert TrainSpec().loss is LossMode.AUTO and TrainConfig().loss is LossMode.AUTO


def _forced(model, hw, t: TrainSpec, loss: LossMode):
    try:
        return plan(model, hw, TrainSpec(**{**t.__dict__, "loss": loss})).chosen
    except NoFitError:
        return None


CASES = {
    # plenty of memory: full fits at the fastest point -> full
    "1b-80gb": ("llama-3.2-1b", HardwareSpec(gpus_per_node=1), TrainSpec(seq_len=2048, global_batch_size=8)),
    # 8B LoRA on one 32 GiB card at 4k: full needs full recomputation, chunked fits with less
    "8b-lora-32gb": ("llama-3.1-8b", HardwareSpec(gpus_per_node=1, gpu_memory_bytes=32 * 2**30),
                     TrainSpec(seq_len=4096, global_batch_size=8, method=Method.LORA)),
    # 8B QLoRA at 16k on a 24 GiB card: the full fp32 logits (27 GiB) cannot fit at all
    "8b-qlora-16k-24gb": ("llama-3.1-8b", HardwareSpec(gpus_per_node=1, gpu_memory_bytes=24 * 2**30),
                          TrainSpec(seq_len=16384, global_batch_size=8, method=Method.QLORA)),
}


@pytest.mark.parametrize("name", CASES)
def test_auto_is_the_faster_fitting_path(name):
    model_name, hw, t = CASES[name]
    m = load_model_spec(model_name)
    full, chunked = _forced(m, hw, t, LossMode.FULL), _forced(m, hw, t, LossMode.CHUNKED)
    p = plan(m, hw, t)
    c = p.chosen
    why = next(r for r in p.reasons if r.startswith("loss auto"))
    if full is None:
        assert c.loss is LossMode.CHUNKED and "the full fp32 logits path does not fit" in why
    elif chunked is not None and chunked.step_time_s < full.step_time_s:
        assert c.loss is LossMode.CHUNKED and "it lets a faster plan fit" in why
        assert c.step_time_s == pytest.approx(chunked.step_time_s)
    else:
        assert c.loss is LossMode.FULL and "the full path fits and is faster" in why
        assert c.step_time_s == pytest.approx(full.step_time_s)
    assert c.step_time_s <= min(x.step_time_s for x in (full, chunked) if x is not None) + 1e-12


def test_each_outcome_is_covered():
    """The three cases above really exercise the three branches (else the test above proves little)."""
    seen = set()
    for model_name, hw, t in CASES.values():
        p = plan(load_model_spec(model_name), hw, t)
        why = next(r for r in p.reasons if r.startswith("loss auto"))
        seen.add("fits-faster" if "faster plan fit" in why else "no-full" if "does not fit" in why else "full")
    assert seen == {"fits-faster", "no-full", "full"}


def test_cli_defaults_pick_chunked_and_say_so(capsys):
    """`plan` with the config's defaults (the example minus its explicit `loss: chunked`)."""
    rc = main(["plan", str(EXAMPLES / "llama3-8b-qlora-16k-1x24gb.yaml"), "--loss", "auto", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["loss"] == "chunked"
    assert any(r.startswith("loss auto → chunked (the full fp32 logits path does not fit") for r in d["reasons"])
    rc = main(["plan", str(EXAMPLES / "llama3-70b-qlora-2x48gb-zero3.yaml")])
    out = capsys.readouterr().out
    assert rc == 0 and "loss auto → chunked (it lets a faster plan fit" in out


def test_hf_runner_keeps_auto_with_liger():
    """Under the Trainer the chunked path is Liger's fused linear cross-entropy (emit/trainer.py)."""
    model_name, hw, t = CASES["8b-qlora-16k-24gb"]
    p = plan(load_model_spec(model_name), hw, TrainSpec(**{**t.__dict__, "runner": Runner.HF_TRAINER}))
    assert p.chosen.loss is LossMode.CHUNKED
    assert any("does not fit" in r for r in p.reasons if r.startswith("loss auto"))
