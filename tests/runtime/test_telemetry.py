"""Telemetry pieces: leak warning, predicted-vs-measured table, byte counting without double counts."""
from __future__ import annotations

import torch

from shardtrain.runtime.state_bytes import Counter
from shardtrain.runtime.telemetry import LeakDetector, comparison_table, rss_bytes


def test_leak_detector_warns_on_steady_growth():
    d = LeakDetector(window=5, min_growth=1 << 20)
    base = 500 << 20
    msgs = [d.update(s, base + s * (2 << 20)) for s in range(1, 12)]
    assert any(msgs) and sum(m is not None for m in msgs) == 1


def test_leak_detector_quiet_when_flat():
    d = LeakDetector(window=5)
    vals = [500, 501, 500, 502, 501, 500, 501, 502, 500, 501]
    assert not any(d.update(s, v << 20) for s, v in enumerate(vals, 1))


def test_counter_counts_shared_memory_once():
    flat = torch.zeros(100)
    views = [flat[:40], flat[40:], flat[20:60]]
    assert Counter()(views) == 100 * 4
    assert Counter()([flat, flat]) == 400
    assert Counter()([torch.zeros(10, dtype=torch.bfloat16), torch.zeros(3)]) == 20 + 12


def test_table_and_rss():
    t = comparison_table({"params": 100, "grads": 100, "master_params": 0, "optimizer_states": 200},
                         {"params": 100, "grads": 102, "master_params": 0, "optimizer_states": 200})
    assert "+2.0%" in t and "model states" in t
    assert rss_bytes() > 10 << 20
