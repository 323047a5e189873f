"""Optimizers (AdamW, bitsandbytes 8-bit AdamW and paged, Adafactor, Lion, SGD) and the schedule."""
from __future__ import annotations

import math

import pytest
import torch

from shardtrain.compiler.specs import Optimizer
from shardtrain.runtime.optim import Lion, build_optimizer, lr_at


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["ddp_adamw8bit", "ddp_adafactor", "ddp_lion", "ddp_sgd", "fsdp_adafactor"])
def test_trains_under_ddp_fsdp(torch_results, name):
    losses = torch_results[name]["losses"]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


@pytest.mark.parametrize("opt", list(Optimizer))
def test_each_optimizer_steps(opt):
    m = _tiny()
    o = build_optimizer(opt, m.parameters(), lr=1e-2)
    x, y = torch.randn(32, 128), torch.randint(0, 4, (32,))
    first = None
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        o.step()
        o.zero_grad()
    assert loss.item() < first


def test_paged_adamw8bit_builds():
    import bitsandbytes as bnb
    o = build_optimizer(Optimizer.ADAMW8BIT, _tiny().parameters(), lr=1e-3, paged=True)
    assert isinstance(o, bnb.optim.PagedAdamW8bit)


def test_offload_uses_deepspeed_cpu_adam():
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    assert isinstance(build_optimizer(Optimizer.ADAMW, _tiny().parameters(), lr=1e-3, offload=True), DeepSpeedCPUAdam)
    with pytest.raises(ValueError, match="Offload"):
        build_optimizer(Optimizer.ADAMW8BIT, _tiny().parameters(), lr=1e-3, offload=True)


def test_lion_update_rule():
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5]))
    o = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    p.grad = torch.tensor([0.3, -0.2, 0.0])
    o.step()
    # m = 0 -> update = sign(0.1 * g)
    assert p.detach().tolist() == pytest.approx([0.9, -0.9, 0.5])
    assert o.state[p]["exp_avg"].tolist() == pytest.approx([0.003, -0.002, 0.0])


def test_schedule_warmup_cosine():
    kw = dict(lr=1.0, warmup=4, total=20, min_ratio=0.1)
    assert [lr_at(s, **kw) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(4, **kw) == pytest.approx(1.0)
    assert lr_at(12, **kw) == pytest.approx(0.55)
    assert lr_at(20, **kw) == pytest.approx(0.1) and lr_at(50, **kw) == pytest.approx(0.1)
    vals = [lr_at(s, **kw) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
