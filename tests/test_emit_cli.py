"""`shardtrain emit`: files per engine, --format outputs equal the written files, errors with exit
codes, and (multiproc) the written directory is a run dir: `bash DIR/launch.sh` trains on CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shardtrain.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/examples/tiny-cpu.yaml")


OWN_SCRIPT = {"trainer_args.json", "accelerate.yaml", "README.md"}  # for the user's own script (emit/trainer.py)


@pytest.mark.parametrize("strategy,expect", [
    ("zero3", {"plan.json", "run.yaml", "ds_config.json", "hf_ds_config.json", "launch.sh", *OWN_SCRIPT}),
    ("fsdp_full_shard", {"plan.json", "run.yaml", "fsdp.json", "launch.sh", *OWN_SCRIPT}),
    ("ddp", {"plan.json", "run.yaml", "launch.sh", *OWN_SCRIPT})])
def test_out_dir_files(strategy, expect, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["emit", TINY, "--strategy", strategy, "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == expect
    assert os.access(out / "launch.sh", os.X_OK)
    launch = (out / "launch.sh").read_text()
    assert ("exec deepspeed" if strategy == "zero3" else "exec torchrun") in launch and str(out) in launch
    fmt = {"zero3": ("deepspeed", "ds_config.json"), "fsdp_full_shard": ("fsdp", "fsdp.json")}.get(strategy)
    capsys.readouterr()
    if fmt:
        assert main(["emit", TINY, "--strategy", strategy, "--format", fmt[0], "--run-dir", str(out)]) == 0
        assert capsys.readouterr().out == (out / fmt[1]).read_text()
    assert main(["emit", TINY, "--strategy", strategy, "--format", "accelerate", "--run-dir", str(out)]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load((out / "accelerate.yaml").read_text())
    assert json.loads((out / "plan.json").read_text())["strategy"] == strategy


def test_multi_node_deepspeed_hostfile(tmp_path):
    out = tmp_path / "mn"
    assert main(["emit", TINY, "--strategy", "zero2", "--nodes", "2", "--gpus-per-node", "2",
                 "--hosts", "gpu-a,gpu-b", "--out", str(out)]) == 0
    assert (out / "hostfile").read_text() == "gpu-a slots=2\ngpu-b slots=2\n"
    assert "--master_addr gpu-a" in (out / "launch.sh").read_text()
    acc = yaml.safe_load((out / "accelerate.yaml").read_text())
    assert acc["main_process_ip"] == "gpu-a" and acc["num_machines"] == 2 and acc["num_processes"] == 4


def test_errors(tmp_path, capsys):
    assert main(["emit", TINY]) == 1
    assert "--out" in capsys.readouterr().err
    assert main(["emit", TINY, "--strategy", "zero2", "--nodes", "2", "--format", "torchrun"]) == 1
    assert "--master-addr" in capsys.readouterr().err
    assert main(["emit", TINY, "--strategy", "ddp", "--format", "deepspeed"]) == 1
    assert "not DeepSpeed" in capsys.readouterr().err
    assert main(["emit", "--model", "llama-3.1-70b", "--gpus-per-node", "1", "--format", "deepspeed"]) == 2
    assert "Nothing emitted" in capsys.readouterr().err


@pytest.mark.multiproc
def test_emitted_dir_trains(tmp_path):
    out = tmp_path / "run"
    assert main(["emit", TINY, "--strategy", "zero2", "--steps", "2", "--set", "run.eval_every=0",
                 "--out", str(out)]) == 0
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "LOCAL_SIZE": "2", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(out / "launch.sh")], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert [m["step"] for m in lines if m.get("kind") == "train"][-1] == 2
