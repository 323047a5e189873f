"""runtime/memtrace.py on a model small enough to count by hand: PyTorch's MemTracker in real mode,
split at the engine's forward / backward / step, files each tensor where the plan has it."""
from __future__ import annotations

import types

import torch
from torch import nn

from shardtrain.compiler.specs import Engine, Precision
from shardtrain.runtime.engines import BaseEngine
from shardtrain.runtime.memtrace import StepMemTrace, by_term
from shardtrain.runtime.memtrace_table import comparison
from shardtrain.runtime.loss import ce_sum

V, H, T = 1000, 64, 32
P_BYTES = 4 * (V * H + H * V)  # embedding + lm_head, fp32


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.lm_head = nn.Linear(H, V, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids):
        return types.SimpleNamespace(logits=self.lm_head(self.embed(input_ids)))


class ToyEngine(BaseEngine):
    kind = Engine.DDP


def _step(eng, ids):
    loss = ce_sum(eng.forward({"input_ids": ids}), ids)
    eng.backward(loss, True)
    eng.step(1e-3)


def test_phases_and_categories():
    torch.manual_seed(0)
    model = Toy()
    eng = ToyEngine(model, torch.optim.AdamW(model.parameters(), foreach=False), precision=Precision.FP32,
                    grad_clip=0.0, device=torch.device("cpu"))
    ids = torch.randint(0, V, (1, T))
    _step(eng, ids)                                # optimizer states exist from here on
    tr = StepMemTrace(eng)
    with tr.step():
        _step(eng, ids)
    assert "forward" not in vars(eng) and "step" not in vars(eng)   # the engine is unwrapped again
    rep = tr.report()
    per = {ph: v["terms"] for ph, v in rep["per_phase"].items()}
    assert set(per) == {"forward", "backward", "optimizer"}
    states = 2 * P_BYTES + 2 * 4                   # exp_avg, exp_avg_sq, a float32 step per param
    for ph in per:
        assert per[ph]["params"] == P_BYTES, ph
    assert per["forward"]["optimizer_states"] == per["backward"]["optimizer_states"] == states
    # the tracker files what optimizer.step() allocates as optimizer state: single-tensor AdamW's
    # temporaries (sqrt, division, denominator) of one parameter at a time
    assert states < per["optimizer"]["optimizer_states"] <= states + 3 * (4 * V * H)
    # zero_grad(set_to_none=True) after step 1: no gradient during the forward; all of them by the step
    assert per["forward"]["grads"] == 0
    assert per["optimizer"]["grads"] == P_BYTES
    # the lm_head output (T×V fp32) and the loss's log_softmax (T−1 rows) are the logits term
    assert per["forward"]["logits"] >= 4 * T * V + 4 * (T - 1) * V
    assert per["forward"]["activations"] < 4 * T * V   # the embedding output and the token ids only
    for v in rep["per_phase"].values():
        assert sum(x for k, x in v["terms"].items() if k != "total") == v["total"]
    assert rep["total"] == max(v["total"] for v in rep["per_phase"].values())


def test_off_by_default_and_rows():
    from shardtrain.config.schema import parse_run_config
    assert parse_run_config({"model": {"name": "tiny-llama"}}).run.memory_trace is False
    meas = {"forward": {"terms": by_term({"Parameter": 10, "Activation": 5, "Logits": 3, "total": 18})}}
    rows = comparison({"forward": {"params": 10, "activations": 4, "logits": 4, "cuda_context": 100, "total": 118}},
                      meas)
    assert ("forward", "total (no cuda_context)", 18, 18) in rows
    assert ("forward", "logits", 4, 3) in rows
