"""Telemetry pieces: leak warning, predicted-vs-measured table, byte counting without double counts."""
from __future__ import annotations

import torch

from shardtrain.compiler.specs import Engine
from shardtrain.runtime.state_bytes import StateMeter, _term
from shardtrain.runtime.telemetry import LeakDetector, comparison_table, rss_bytes


def test_leak_detector_warns_on_steady_growth():
    d = LeakDetector(window=5, min_growth=1 << 20)
    base = 500 << 20
    msgs = [d.update(s, base + s * (2 << 20)) for s in range(1, 40)]  # warm-up + 4 windows of 5 steps
    assert any(msgs) and sum(m is not None for m in msgs) == 1


def test_leak_detector_quiet_when_flat():
    d = LeakDetector(window=5)
    vals = [500, 501, 500, 502, 501, 500, 501, 502, 500, 501]
    assert not any(d.update(s, v << 20) for s, v in enumerate(vals, 1))


def test_terms_by_path():
    assert _term("module.model.layers.0.mlp.up_proj.weight") == "params"
    assert _term("opt.single_partition_of_fp32_groups[0]") == "master_params"
    assert _term("inner.state[#3][exp_avg]") == "optimizer_states"
    assert _term("opt.grads_in_partition") == "grads" and _term("param.lm_head.weight.grad") == "grads"
    assert _term("opt.ipg_buckets[#0].buffer[1]") == "buffers"


class _Eng:
    kind = Engine.DDP

    def __init__(self):
        self.model = torch.nn.Linear(64, 32, bias=False)
        self.optimizer = torch.optim.AdamW(self.model.parameters())


def test_meter_counts_each_storage_once():
    eng = _Eng()
    flat = torch.zeros(64 * 32)
    eng.model.weight.grad = flat.view(32, 64)          # a gradient that is a view into a bucket
    meter = StateMeter(eng)
    eng.optimizer.step()                               # pre-hook snapshot: params, grads, fresh states
    meter.after_step()
    dev, host = meter.report()
    assert dev == {"params": 8192, "master_params": 0, "optimizer_states": 2 * 8192 + 4, "grads": 8192}  # + the step counter
    assert host == {}


def test_table_and_rss():
    t = comparison_table({"params": 100, "grads": 100, "master_params": 0, "optimizer_states": 200},
                         {"params": 100, "grads": 102, "master_params": 0, "optimizer_states": 200})
    assert "+2.0%" in t and "model states" in t
    assert rss_bytes() > 10 << 20
