"""The real entry point under the real launchers: `torchrun -m shardtrain.runtime.worker --run-dir`
is pre-empted (SIGUSR2 → checkpoint → exit 75 = EXIT_PREEMPTED, issue 13, with a "preempted" line), then the
deepspeed launcher
(which appends --local_rank=N) resumes the same run directory to the end."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rundirs import make_run_dir

pytestmark = pytest.mark.multiproc


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def test_cli_preempt_then_resume_with_deepspeed_launcher(tmp_path):
    d = make_run_dir(tmp_path / "run", {"train": {"strategy": "zero2", "precision": "bf16", "steps": 4},
                                        "run": {"eval_every": 2}})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "shardtrain.runtime.worker", "--run-dir", str(d)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=_env(SHARDTRAIN_TEST_SIGNAL_AT_STEP="2"))
    from shardtrain.exitcodes import EXIT_PREEMPTED
    assert p.returncode != 0, p.stderr[-4000:]  # torchrun exits 1 and reports each worker's code
    assert f"exitcode  : {EXIT_PREEMPTED}" in p.stderr and "Traceback" not in p.stdout, p.stderr[-4000:]
    assert "preempted at step 2" in p.stdout + p.stderr
    assert not (d / "final").exists()
    ds = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    if ds is None:
        pytest.skip("deepspeed launcher not installed")
    cmd = [ds, "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "shardtrain.runtime.worker",
           "--run-dir", str(d)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [2, 4]
    assert (d / "final" / "model.safetensors").is_file()
    for r in (0, 1):
        assert json.loads((d / f"memory_rank{r}.json").read_text())["strategy"] == "zero2"


def test_cli_arguments():
    from shardtrain.runtime import worker
    p = subprocess.run([sys.executable, "-m", "shardtrain.runtime.worker", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "--run-dir" in p.stdout
    with pytest.raises(SystemExit):
        worker.main(["--run-dir", "x", "--bogus"])
