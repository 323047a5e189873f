"""The run-directory format (shardtrain/rundir_format.py) is the one contract between the runtime that
writes a run dir, the launcher that prepares and summarises it and `shardtrain report` that reads it.

File-level only: no processes. The metrics are written by the runtime's own MetricsWriter and read back
by the launcher's summary, the resume step count and the report.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from shardtrain import rundir_format as rf
from shardtrain.launcher.supervise import metrics_summary
from shardtrain.runreport import load_run
from shardtrain.runtime.telemetry import MetricsWriter

ROOT = Path(__file__).resolve().parents[1]


def _train(step: int, loss: float) -> dict:
    return {"kind": "train", "step": step, "loss": loss, "memory": {"after_step": {"rss": 1000 + step}}}


def test_metrics_written_by_the_runtime_are_read_by_launcher_and_report(tmp_path):
    (tmp_path / rf.PLAN_JSON).write_text("{}")
    w = MetricsWriter(tmp_path / rf.METRICS_JSONL, enabled=True, flush_every=100, flush_interval_s=1e9)
    for s in (1, 2, 3):
        w.write(_train(s, 5.0 - s))
    w.write({"kind": "eval", "step": 3, "eval_loss": 1.5})
    w.flush()
    with open(tmp_path / rf.METRICS_JSONL, "a") as f:
        f.write('{"kind": "train", "step": 4, "lo')  # a line cut by a kill
    w.write(_train(4, 0.5))  # the resumed run rewrites step 4 on a fresh line
    w.flush()
    recs = rf.read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 3, 4]
    assert rf.completed_steps(tmp_path) == 4
    assert metrics_summary(tmp_path) == "step 4, loss 4.000 → 0.500"
    assert [s["step"] for s in load_run(tmp_path)["steps"]] == [1, 2, 3, 4]  # eval records carry no memory

    w.truncate_after(2)  # resume from the step-2 checkpoint: later records go, the cut line too
    assert [r["step"] for r in rf.read_metrics(tmp_path)] == [1, 2]
    assert rf.completed_steps(tmp_path) == 2
    assert rf.read_metrics(tmp_path / "absent") == [] and metrics_summary(tmp_path / "absent") == ""


def test_file_names_are_spelled_only_in_the_format_module():
    """No string constant under shardtrain/ equals a run-dir file name except in rundir_format.py."""
    names = {rf.RUN_YAML, rf.PLAN_JSON, rf.DS_CONFIG_JSON, rf.FSDP_JSON, rf.COMMAND_TXT, rf.METRICS_JSONL,
             rf.CHECKPOINTS, rf.COMPLETE, rf.LATEST, rf.MANIFEST, rf.TRAINER_STATE, rf.MEMORY_RANK_GLOB,
             rf.LAUNCHER_LOG}
    found = []
    for p in sorted((ROOT / "shardtrain").rglob("*.py")):
        if p.name == "rundir_format.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{p.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "use shardtrain.rundir_format's names:\n" + "\n".join(found)


def test_format_module_imports_neither_torch_nor_launcher_nor_config():
    code = ("import sys, shardtrain.rundir_format; "
            "print([m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith(('shardtrain.launcher', "
            "'shardtrain.config', 'shardtrain.compiler'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout.replace("'", '"')) == []
