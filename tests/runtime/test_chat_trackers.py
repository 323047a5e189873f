"""Issue 12 acceptance, one 2-rank torchrun launch: a chat JSONL run reporting to TensorBoard and a
parquet run both train with labels on assistant turns only; the TensorBoard event files (read back
with tensorboard's own EventAccumulator) hold the loss and per-phase memory series."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import STEPS, run_driver

pytestmark = pytest.mark.multiproc


def conversations(n: int = 48) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "You keep answers short."},
                          {"role": "user", "content": f"Question {i}: what colour is the sky at noon?"},
                          {"role": "assistant", "content": f"Reply {i}: blue."},
                          {"role": "user", "content": "Question again: and at night?"},
                          {"role": "assistant", "content": "Reply: dark."}]} for i in range(n)]


@pytest.fixture(scope="module")
def chat_results(tmp_path_factory):
    base = tmp_path_factory.mktemp("rt_chat")
    rows = conversations()
    jsonl = base / "chat.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = base / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    common = {"train": {"strategy": "ddp", "precision": "fp32", "steps": STEPS}}
    sc = [
        {"name": "chat_tb", "probe": "labels", "over": {
            **common, "data": {"train": str(jsonl), "chat_template": "default", "eval_fraction": 0},
            "run": {"report_to": ["tensorboard"], "device": "cpu", "checkpoint_every": 0, "eval_every": 0}}},
        {"name": "parquet", "probe": "labels", "over": {
            **common, "data": {"train": str(parquet), "chat_template": "default", "packing": False,
                               "eval_fraction": 0}}},
    ]
    return run_driver(base, sc)


@pytest.mark.parametrize("name", ["chat_tb", "parquet"])
def test_trains_on_assistant_turns_only(chat_results, name):
    res = chat_results[name]
    assert "error" not in res, res.get("traceback")
    assert len(res["losses"]) == STEPS and all(math.isfinite(x) for x in res["losses"])
    learned = "".join(res["probe"]["learned"])  # packed blocks may cut a reply in two: join them
    assert "Reply 0: blue.</s>" in learned and "Reply: dark.</s>" in learned, learned
    rest = learned
    for i in range(48):
        rest = rest.replace(f"Reply {i}: blue.</s>", "")
    rest = rest.replace("Reply: dark.</s>", "")
    assert not any(w in learned for w in ("Question", "colour", "short", "<|")), learned
    assert len(rest) < 40, rest  # only the pieces of replies cut at the first/last block edge remain
    assert 0.05 < res["probe"]["label_fraction"] < 0.5


def test_tensorboard_event_files_hold_loss_and_memory(chat_results):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = Path(chat_results["chat_tb"]["run_dir"]) / "tensorboard"
    assert list(tb.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    want = [json.loads(x)["loss"] for x in (tb.parent / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in loss] == pytest.approx(want, rel=1e-6)
    for t in ("train/lr", "train/grad_norm", "train/tokens_per_s", "memory/predicted/total_bytes",
              "memory/after_backward/rss_bytes"):
        assert t in tags and len(acc.Scalars(t)) == STEPS, (t, sorted(tags))
    # the engine-object walk (model states) runs on the measured step only (issue 11: free elsewhere)
    ms = acc.Scalars("memory/after_step/model_states_bytes")
    assert [e.step for e in ms] == [2] and ms[0].value > 0
    assert "plan/text_summary" in acc.Tags()["tensors"]  # the plan as text
    # no tracker asked for: no event files
    assert not (Path(chat_results["parquet"]["run_dir"]) / "tensorboard").exists()
