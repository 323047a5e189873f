"""Issue 21 (3): a Slurm job requeued on FEWER nodes re-plans and resumes. `shardtrain sbatch --min-nodes M`
renders ``#SBATCH --nodes=M-N`` and torchrun ``--nnodes M:N``; at its start the batch script compares the
allocation with the run dir's plan and, when they differ, re-prepares the run dir for the nodes it got (the
run-dir check allows a hardware change and says what was re-planned; the workers resume from the portable
checkpoint: tests/runtime/test_portable_resume.py). Scripts run by bash with fake scontrol/srun/python
(tests/test_slurm_render.py's helpers); the re-prepare itself is the real `slurm.cli prepare`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardtrain.slurm.job import SbatchJob
from shardtrain.slurm.script import launcher_argv, render
from test_slurm_render import _bash_n, _fake_slurm, _run_script

ROOT = Path(__file__).resolve().parents[1]


def _job(run_dir, fake_py, **kw) -> SbatchJob:
    return SbatchJob(run_dir=str(run_dir), nodes=2, gpus_per_node=2, python=str(fake_py), config="/cfg/run.yaml",
                     overrides=("train.steps=8",), **kw)


def test_min_nodes_renders_a_node_range(tmp_path):
    from torch.distributed.run import get_args_parser, parse_min_max_nnodes
    job = _job(tmp_path / "r", "/usr/bin/python3", min_nodes=1)
    text = render(job)
    _bash_n(text, tmp_path)
    assert "#SBATCH --nodes=1-2" in text.splitlines()
    a = get_args_parser().parse_args([str(w) for w in launcher_argv(job)[3:]])
    assert parse_min_max_nnodes(a.nnodes) == (1, 2)
    assert "SHARDTRAIN_NNODES" not in render(_job(tmp_path / "r", "/usr/bin/python3"))  # unchanged without it
    with pytest.raises(ValueError, match="torchrun"):
        _job(tmp_path / "r", "/usr/bin/python3", min_nodes=1, launcher="deepspeed")
    with pytest.raises(ValueError, match="min_nodes"):
        _job(tmp_path / "r", "/usr/bin/python3", min_nodes=3)


@pytest.mark.parametrize("allocated, replans", [(1, True), (2, False)])
def test_a_requeue_on_fewer_nodes_re_prepares_for_them(tmp_path, allocated, replans):
    bindir, record, fake_py = _fake_slurm(tmp_path, nodes=allocated)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "plan.json").write_text(json.dumps({"strategy": "ddp", "world_size": 4, "fits": True}, indent=2))
    proc = _run_script(render(_job(run_dir, fake_py, min_nodes=1)), tmp_path, bindir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = [json.loads(x)["argv"] for x in record.read_text().splitlines()]
    prepares = [c for c in calls if c[:3] == ["-m", "shardtrain.slurm.cli", "prepare"]]
    launches = [c for c in calls if "torch.distributed.run" in c]
    if replans:
        assert prepares == [["-m", "shardtrain.slurm.cli", "prepare", "/cfg/run.yaml", "--set", "train.steps=8",
                             "--run-dir", str(run_dir), "--command-file", str(tmp_path / "job.sbatch"),
                             "--set", "hardware.nodes=1"]]
        assert "1 node(s) allocated: re-planning" in proc.stdout
    else:
        assert prepares == []
    assert len(launches) == allocated  # srun ran one launcher per allocated node
    assert all(c[c.index("--nnodes") + 1] == "1:2" for c in launches)


def test_the_re_prepare_is_accepted_on_a_run_dir_with_checkpoints(tmp_path, capsys):
    """The real `slurm.cli prepare` with hardware.nodes lowered, on a run dir holding training state."""
    from shardtrain.slurm.cli import main
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {name: tiny-llama}\nhardware: {nodes: 2, gpus_per_node: 2}\n"
                   "train: {seq_len: 64, global_batch: 8, micro_batch: 2, precision: fp32, steps: 10, strategy: ddp}\n"
                   "data: {train: demo}\nrun: {device: cpu}\n")
    d = tmp_path / "run"
    assert main(["prepare", str(cfg), "--run-dir", str(d)]) == 0
    (d / "metrics.jsonl").write_text('{"kind": "train", "step": 2, "loss": 6.0}\n')
    (d / "checkpoints" / "step_2").mkdir(parents=True)
    capsys.readouterr()
    assert main(["prepare", str(cfg), "--run-dir", str(d), "--set", "hardware.nodes=1"]) == 0
    out = capsys.readouterr().out
    assert "re-planned for the resume: ranks 4 → 2" in out, out
    plan = json.loads((d / "plan.json").read_text())
    assert (plan["world_size"], plan["global_batch_size"]) == (2, 8) and (d / "checkpoints" / "step_2").is_dir()
