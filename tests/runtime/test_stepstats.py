"""Issue 11: the loop's per-step scalars without extra collectives (runtime/stepstats.py) and the
batched metrics writer (runtime/telemetry.py)."""
from __future__ import annotations

import json
import random

from shardtrain.runtime.data import IGNORE, StepSampler, TokenDataset, count_label_tokens
from shardtrain.runtime.stepstats import GlobalTokens
from shardtrain.runtime.telemetry import MetricsWriter


def test_global_tokens_equal_the_all_reduced_batch_counts():
    rng = random.Random(3)
    samples = []
    for _ in range(37):  # unpacked samples of different lengths, some labels masked (prompt tokens)
        n = rng.randint(2, 20)
        ids = [rng.randint(3, 99) for _ in range(n)]
        labels = [IGNORE if rng.random() < 0.3 else t for t in ids]
        samples.append((ids, labels))
    ds = TokenDataset(samples, pad_id=0)
    world, k = 3, 2
    gt = GlobalTokens(ds, StepSampler(len(ds), 5, micro_batch=4, grad_accum=k, world_size=world, rank=1))
    for step in (0, 1, 4, 9):  # 9: the second epoch (another permutation)
        want_label = want_input = 0
        for r in range(world):  # what every rank collates, summed: the old all-reduce
            s = StepSampler(len(ds), 5, micro_batch=4, grad_accum=k, world_size=world, rank=r)
            for ix in s.step_indices(step):
                b = ds.collate(ix)
                want_label += count_label_tokens(b)
                want_input += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
        assert gt.step(step) == (want_label, want_input)


def test_metrics_batched_and_flushed(tmp_path):
    p = tmp_path / "metrics.jsonl"
    m = MetricsWriter(p, True, flush_every=3, flush_interval_s=3600)
    m.write({"step": 1})
    m.write({"step": 2})
    assert not p.exists()  # buffered
    m.write({"step": 3})
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2, 3]
    m.write({"step": 4})
    with open(p, "a") as f:
        f.write('{"step": 5, "lo')  # another process's line cut by SIGKILL
    m.flush()  # starts a new line: record 4 survives
    assert [json.loads(x)["step"] for x in p.read_text().splitlines() if x.endswith("}")] == [1, 2, 3, 4]
    m.write({"step": 5})
    m.truncate_after(4)  # flushes first, then drops steps after the checkpoint and the cut line
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2, 3, 4]
    slow = MetricsWriter(tmp_path / "slow.jsonl", True, flush_every=100, flush_interval_s=0.0)
    slow.write({"step": 1})  # slow steps are written one by one
    assert (tmp_path / "slow.jsonl").read_text().count("\n") == 1
