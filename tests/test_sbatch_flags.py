"""`shardtrain sbatch` takes the same plan flags as plan/emit/check/launch (issue 12)."""
from __future__ import annotations

from pathlib import Path

import yaml

from shardtrain.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_sbatch_accepts_plan_flags(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["sbatch", str(ROOT / "configs/examples/llama3-8b-full-8x80gb.yaml"), "--model", "llama-3.2-1b",
                 "--seq-len", "1024", "--micro-batch", "1", "--nodes", "2", "--gpus-per-node", "8",
                 "--run-dir", str(run)])
    script = capsys.readouterr().out
    assert code == 0
    # the compute nodes re-prepare with the same overrides, and the prepared run dir already has them
    assert "--set model.name=llama-3.2-1b" in script and "--set train.seq_len=1024" in script
    cfg = yaml.safe_load((run / "run.yaml").read_text())
    assert cfg["model"]["name"] == "llama-3.2-1b" and cfg["train"]["seq_len"] == 1024
    assert cfg["hardware"]["nodes"] == 2 and cfg["hardware"]["gpus_per_node"] == 8


def test_sbatch_still_needs_nodes(capsys, tmp_path):
    try:
        main(["sbatch", str(ROOT / "configs/examples/tiny-cpu.yaml"), "--run-dir", str(tmp_path / "r")])
    except SystemExit as e:
        assert "--nodes" in str(e)
    else:
        raise AssertionError("sbatch without --nodes must refuse")
