"""Issue 13 (e): `shardtrain launch --max-restarts N` (torchrun's elastic agent; DeepSpeed plans go
through torchrun too when restarts are asked for: checked with --dry-run). Restart attempt 0: rank 1 is SIGKILLed right after step 5; attempt 1: rank 1 is
SIGKILLed in the middle of writing the step-6 checkpoint. Each time the group restarts and resumes from
the last COMPLETE checkpoint (step 4: the half-written step 6 is never loaded), and the run finishes
with the uninterrupted run's final parameters and losses, bitwise (fp32, CPU gloo). The killed run is
DDP to keep CI time down (each restart costs a process start-up); the engines' resume exactness,
ZeRO-2/3 included, is tested in tests/runtime/test_checkpoint_resume.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "examples" / "tiny-cpu.yaml"
ARGS = ["--steps", "8", "--strategy", "ddp", "--set", "run.eval_every=0", "--set", "run.checkpoint_every=2"]


def _launch(args, **env):
    e = {**os.environ, "DS_ACCELERATOR": "cpu", **env}
    e.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = ["timeout", "-k", "10", "600", sys.executable, "-m", "shardtrain", "launch", str(TINY), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=ROOT)


def _losses(run: Path) -> list[float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r.get("kind", "train") == "train"]


@pytest.mark.multiproc
def test_kill9_and_kill_during_save_restart_and_finish_exactly(tmp_path):
    from safetensors.torch import load_file
    ref, ela = tmp_path / "ref", tmp_path / "elastic"
    r = _launch(["--run-dir", str(ref), *ARGS])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    r = _launch(["--run-dir", str(ela), *ARGS, "--max-restarts", "2"],
                SHARDTRAIN_TEST_KILL="0:1:5:step;1:1:6:save")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "restart 1 of 2: rank 1 killed by SIGKILL; resumed at step 4" in out, out[-4000:]
    assert "restart 2 of 2: rank 1 killed by SIGKILL; resumed at step 4" in out, out[-4000:]
    assert _losses(ela) == _losses(ref) and [s for s, _ in _losses(ela)] == list(range(1, 9))
    a = load_file(str(next((ela / "final").glob("*.safetensors"))))
    b = load_file(str(next((ref / "final").glob("*.safetensors"))))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert not list((ela / "checkpoints").glob(".tmp_*"))


def test_deepspeed_plans_restart_under_torchrun(tmp_path, capsys):
    from shardtrain.cli import main
    from shardtrain.launcher.restart import launcher_for_restarts
    assert launcher_for_restarts(None, "deepspeed", 2) == "torchrun"
    assert launcher_for_restarts(None, "deepspeed", 0) == "deepspeed"
    with pytest.raises(ValueError, match="does not restart"):
        launcher_for_restarts("deepspeed", "deepspeed", 1)
    rc = main(["launch", str(TINY), "--strategy", "zero2", "--max-restarts", "2", "--run-dir", str(tmp_path / "r"),
               "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "-m torch.distributed.run" in out and "--max_restarts 2" in out
