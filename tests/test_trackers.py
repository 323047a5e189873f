"""run.report_to: the record -> tracker mapping, and the optional wandb (offline) / mlflow (file
store) paths, read back with their own APIs. TensorBoard runs end to end in
tests/runtime/test_chat_trackers.py (always, in CI)."""
from __future__ import annotations

import types

import pytest

from emit_plans import make_plan
from shardtrain.config.schema import ConfigError, parse_run_config
from shardtrain.runtime.telemetry import MetricsWriter
from shardtrain.runtime.trackers import flat_metrics, with_trackers

REC = {"kind": "train", "step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.7, "tokens_per_s": 900.0,
       "step_time_s": 0.1, "memory": {"after_forward": {"allocated": 10, "reserved": 20},
                                      "after_step": {"allocated": 12, "reserved": 20}}}


def test_flat_metrics():
    m = flat_metrics(REC, {"total": 99})
    assert m["train/loss"] == 2.5 and m["train/grad_norm"] == 0.7
    assert m["memory/after_forward/allocated_bytes"] == 10 and m["memory/after_step/reserved_bytes"] == 20
    assert m["memory/predicted/total_bytes"] == 99
    ev = flat_metrics({"kind": "eval", "step": 2, "eval_loss": 2.0, "eval_ppl": 7.4}, {"total": 99})
    assert ev == {"eval/eval_loss": 2.0, "eval/eval_ppl": 7.4}


def test_report_to_is_validated():
    with pytest.raises(ConfigError, match="run.report_to"):
        parse_run_config({"model": {"name": "tiny-llama"}, "run": {"report_to": ["tensorbored"]}})
    assert parse_run_config({"model": {"name": "tiny-llama"}}).run.report_to is None


def fake_run(tmp_path, tracker):
    cfg = parse_run_config({"model": {"name": "tiny-llama"}, "run": {"report_to": [tracker], "name": "t1"}})
    return types.SimpleNamespace(cfg=cfg, plan=make_plan(strategy="zero2", gpus_per_node=8), run_dir=tmp_path,
                                 info=types.SimpleNamespace(is_main=True))


def log_two_steps(tmp_path, tracker, before_close=None):
    m = with_trackers(MetricsWriter(tmp_path / "metrics.jsonl", True), fake_run(tmp_path, tracker))
    m.write(REC)
    m.write({**REC, "step": 2, "loss": 2.0})
    m.write({"kind": "eval", "step": 2, "eval_loss": 1.9, "eval_ppl": 6.7})  # eval after train, same step
    m.write({**REC, "step": 3, "loss": 1.5})
    if before_close:
        before_close(m.trackers[0])
    m.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_mlflow_file_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow is an optional tracker (pip install mlflow)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    log_two_steps(tmp_path, "mlflow")
    client = mlflow.tracking.MlflowClient((tmp_path / "mlruns").as_uri())
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert run.info.run_name == "t1" and run.data.params["strategy"] == "zero2"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2.5, 2.0, 1.5]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/eval_loss")] == [2]


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional tracker (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    seen = {}

    def read_back(t):  # wandb's own run object (offline runs have no API to query afterwards); wandb
        # commits a step's row when the next step arrives, so the summary holds step 2 here
        seen.update(loss=t.run.summary["train/loss"], eval=t.run.summary["eval/eval_loss"],
                    strategy=t.run.config["strategy"], name=t.run.name,
                    mem=t.run.summary["memory/after_step/allocated_bytes"])
    log_two_steps(tmp_path, "wandb", read_back)
    assert seen == {"loss": 2.0, "eval": 1.9, "strategy": "zero2", "name": "t1", "mem": 12}
    run_file = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert run_file.stat().st_size > 0  # `wandb sync` uploads this later
