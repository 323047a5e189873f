"""Resume after pre-emption (DDP state dicts, FSDP2 DCP, DeepSpeed save_checkpoint): the step
counter continues, sampling continues where it stopped (identical losses to an uninterrupted run:
no sample or step repeated or lost), and metrics.jsonl holds each step exactly once."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import RESUME_ENGINES

pytestmark = pytest.mark.multiproc


def records(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("engine", RESUME_ENGINES)
def test_resume_continues_exactly(resume_results, engine):
    pre, post, ref = (resume_results[f"{k}_{engine}"] for k in ("pre", "post", "ref"))
    assert pre["preempted"] and pre["start_step"] == 0 and len(pre["losses"]) == 3
    assert not post["preempted"] and post["start_step"] == 3
    assert pre["losses"] + post["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    got, want = records(post["run_dir"]), records(ref["run_dir"])
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    train_steps = [r["step"] for r in got if r["kind"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    for a, b in zip(got, want):
        key = "loss" if a["kind"] == "train" else "eval_loss"
        assert a[key] == pytest.approx(b[key], rel=1e-5)
    ck = Path(post["run_dir"]) / "checkpoints"
    assert (ck / "step_3" / "COMPLETE").is_file() and (ck / "step_6" / "COMPLETE").is_file()
    state = json.loads((ck / "step_3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["samples_seen"] == 3 * 8
    final = Path(post["run_dir"]) / "final"
    assert (final / ("adapter_config.json" if engine.startswith("lora_") else "config.json")).is_file()


@pytest.mark.parametrize("engine", RESUME_ENGINES)
def test_resume_is_exact(resume_results, engine):
    """Issue 13 (d): stop at step 3 (a different stop signal per engine), resume: every logged loss and
    the final parameters equal the uninterrupted run's. fp32 on CPU gloo, same reduction order in both
    runs: we assert BITWISE equality (no tolerance)."""
    from safetensors.torch import load_file
    pre, post, ref = (resume_results[f"{k}_{engine}"] for k in ("pre", "post", "ref"))
    assert pre["preempted"] and post["start_step"] == 3
    assert pre["losses"] + post["losses"] == ref["losses"]  # bitwise: float == float
    got, want = records(post["run_dir"]), records(ref["run_dir"])
    assert [r.get("loss", r.get("eval_loss")) for r in got] == [r.get("loss", r.get("eval_loss")) for r in want]
    a = load_file(str(next((Path(post["run_dir"]) / "final").glob("*.safetensors"))))
    b = load_file(str(next((Path(ref["run_dir"]) / "final").glob("*.safetensors"))))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), \
        max((a[k] - b[k]).abs().max().item() for k in a)
    ck = Path(post["run_dir"]) / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_6"
    assert not list(ck.glob(".tmp_*"))  # nothing half-written left behind


def test_latest_checkpoint_ignores_incomplete(tmp_path):
    from shardtrain.runtime.checkpoint import latest_checkpoint
    for n, done in ((2, True), (4, True), (6, False)):
        d = tmp_path / "checkpoints" / f"step_{n}"
        d.mkdir(parents=True)
        if done:  # the layout before MANIFEST.json existed: trainer_state.json, then COMPLETE
            (d / "trainer_state.json").write_text(json.dumps({"step": n}))
            (d / "COMPLETE").write_text("")
    assert latest_checkpoint(tmp_path)[0] == 4
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_metrics_truncated_on_resume(tmp_path):
    from shardtrain.runtime.telemetry import MetricsWriter
    m = MetricsWriter(tmp_path / "metrics.jsonl", True)
    for s in range(1, 6):
        m.write({"kind": "train", "step": s})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "tra')  # a record cut by SIGKILL
    m.truncate_after(3)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
