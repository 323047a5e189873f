"""Issue 21 through `shardtrain launch` (real torchrun, 2 CPU ranks, tiny Llama):

- a pre-emption (exit 75) under --max-restarts does not use up a restart: the launch ends with 75 after
  one torchrun attempt, and the same command then resumes and finishes;
- train.max_nonfinite_steps NaN steps in a row stop the launch with exit 65 and a STOPPED summary, with
  and without --max-restarts (no restart is spent on it), the checkpoints intact;
- multi-line errors render as indented lines, control characters stay escaped (unit level).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "examples" / "tiny-cpu.yaml"
ARGS = ["--steps", "6", "--strategy", "ddp", "--set", "run.eval_every=0", "--set", "run.checkpoint_every=2"]


def _launch(args, **env):
    e = {**os.environ, "DS_ACCELERATOR": "cpu", **env}
    e.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = ["timeout", "-k", "10", "600", sys.executable, "-m", "shardtrain", "launch", str(TINY), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=ROOT)


def _attempts(run: Path) -> list[Path]:
    return sorted(run.glob("logs/*/*/attempt_*"))


@pytest.mark.multiproc
def test_preemption_does_not_use_up_a_restart(tmp_path):
    run = tmp_path / "pre"
    r = _launch(["--run-dir", str(run), *ARGS, "--max-restarts", "2"], SHARDTRAIN_TEST_SIGNAL_AT_STEP="3")
    out = r.stdout + r.stderr
    assert r.returncode == 75, out[-4000:]
    assert "PREEMPTED" in out and "checkpoint at step 3" in out and "restart 1 of" not in out, out[-4000:]
    assert [a.name for a in _attempts(run)] == ["attempt_0"], _attempts(run)
    r = _launch(["--run-dir", str(run), *ARGS, "--max-restarts", "2"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "resumed from" in r.stdout + r.stderr and (run / "final").is_dir()


@pytest.mark.multiproc
@pytest.mark.parametrize("restarts", [0, 1])
def test_nonfinite_steps_in_a_row_stop_the_launch_with_exit_65(tmp_path, restarts):
    run = tmp_path / f"nan{restarts}"
    r = _launch(["--run-dir", str(run), *ARGS, "--set", "train.max_nonfinite_steps=2", "--max-restarts", str(restarts)],
                SHARDTRAIN_TEST_NONFINITE="0:3,4,5,6")
    out = r.stdout + r.stderr
    assert r.returncode == 65, out[-4000:]
    assert "stopped at step 4: 2 steps in a row had a non-finite loss" in out, out[-4000:]
    assert "STOPPED" in out and "the last checkpoint (step 2) is intact" in out and "restart 1 of" not in out
    assert len(_attempts(run)) == 1
    from shardtrain.cli import main
    assert main(["verify", str(run)]) == 0


def test_multiline_errors_render_as_lines_and_control_characters_stay_escaped():
    from shardtrain.cli import error_text
    msg = "run dir r holds checkpoints of another config:\n  train.lr: 1e-3 → 2e-3\nStart fresh with --no-resume"
    assert error_text(msg).splitlines() == [
        "shardtrain: error: run dir r holds checkpoints of another config:",
        "    train.lr: 1e-3 → 2e-3",
        "  Start fresh with --no-resume"]
    assert "\\n" not in error_text(msg)
    hostile = "unknown key 'a\rb\x1b[2Jc'\n"
    assert error_text(hostile) == "shardtrain: error: unknown key 'a\\rb\\x1b[2Jc'"


def test_the_config_mismatch_error_prints_real_lines(tmp_path, capsys):
    """The issue's case: `launch` on a run dir whose checkpoints depend on a changed key printed a literal
    \\n in its one error line; now each change is a line of its own (no process is started)."""
    import yaml
    from shardtrain.cli import main
    from shardtrain.launcher.rundir import prepare_run_dir
    run = tmp_path / "r"
    prepare_run_dir(yaml.safe_load(TINY.read_text()), {"train.steps": 2}, run)
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 6.0}\n')
    capsys.readouterr()
    assert main(["launch", str(TINY), "--run-dir", str(run), "--steps", "2", "--set", "train.seed=99"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert "\\n" not in "".join(err)
    assert err[0].startswith("shardtrain: error: run dir ") and err[0].endswith(":")
    assert err[1].strip().startswith("train.seed: 1234 → 99") and err[1].startswith("  ")
    assert "--no-resume" in err[-1] and err[-1].startswith("  ")
